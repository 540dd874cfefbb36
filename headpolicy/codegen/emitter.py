"""Render a spec into Triton source, keep it in an on-disk cache, import it once per process.

    spec = PrefillSpec(...)
    module = load_kernels(spec)          # writes <cache>/<spec.name(sha)>.py once, imports it once
    module.prefill_kernel[grid](...)

Cache directory: $HEADPOLICY_KERNEL_CACHE, else ~/.cache/headpolicy/kernels.
Switch: HEADPOLICY_DISABLE_CODEGEN=1 (or `set_enabled(False)`) makes every load raise
CodegenDisabledError; the custom ops then need backend "reference".
"""

from __future__ import annotations

import importlib.util
import logging
import os
import string
import sys
import threading
from pathlib import Path

from headpolicy.codegen import templates
from headpolicy.codegen.spec import TL_DTYPES, DecodeSpec, HeadRun, PrefillSpec, template_hash
from headpolicy.errors import CodegenDisabledError, KernelCompileError, OutputError
from headpolicy.io import atomic_write

log = logging.getLogger(__name__)

TEMPLATES = {"prefill": templates.PREFILL, "decode": templates.DECODE}
_loaded: dict[str, object] = {}
_lock = threading.Lock()
_enabled: bool | None = None  # None: follow the environment


def set_enabled(enabled: bool | None) -> None:
    """Allow (True) or forbid (False) generating/compiling kernels; None follows HEADPOLICY_DISABLE_CODEGEN."""
    global _enabled
    _enabled = enabled


def codegen_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get("HEADPOLICY_DISABLE_CODEGEN", "").strip().lower() not in {"1", "true", "yes", "on"}


def cache_dir() -> Path:
    root = os.environ.get("HEADPOLICY_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "headpolicy" / "kernels"


def _matmul_values(spec) -> dict:
    """How tl.dot is called: fp32 inputs use exact IEEE products (tf32 would drift from the
    float32 reference); upcast_matmul turns bf16 tiles into fp32 first (interpreter builds)."""
    fp32_inputs = spec.dtype == "f32" or spec.upcast_matmul
    return dict(
        dot_kwargs=', input_precision="ieee"' if fp32_inputs else "",
        mm_in=".to(tl.float32)" if spec.upcast_matmul else "",
        p_dtype="tl.float32" if spec.upcast_matmul else TL_DTYPES[spec.dtype],
        mm_note=(
            "upcast to float32 (interpreter build: numpy has no bfloat16 matmul)"
            if spec.upcast_matmul
            else f"{spec.dtype}, float32 accumulation" + (" (IEEE, no tf32)" if spec.dtype == "f32" else "")
        ),
    )


def _table_comment(runs: tuple[HeadRun, ...]) -> str:
    return "\n".join(f"#     {r.describe()}" for r in runs)


def _prefill_dispatch(runs: tuple[HeadRun, ...]) -> str:
    """The per-KV-head if/elif chain: each branch calls a helper with its rule as constexprs."""
    args = "acc, m_i, l_i, q, q_rank, k_base, v_base, stride_kt, stride_vt, pad, T, q_first, q_end, qk_scale, trace_row"
    lines = []
    for i, run in enumerate(runs):
        if run.retrieval:
            call = f"_retrieval_head({args}, TRACE)"
        else:
            call = f"_streaming_head({args}, {run.sink}, {run.window}, TRACE)"
        last = i == len(runs) - 1
        if len(runs) == 1:
            lines.append(f"    acc, m_i, l_i = {call}  # {run.describe()}")
            break
        head = "if" if i == 0 else ("else" if last else "elif")
        cond = "" if last else f" h < {run.stop}"
        lines.append(f"    {head}{cond}:  # {run.describe()}")
        lines.append(f"        acc, m_i, l_i = {call}")
    return "\n".join(lines)


def render(spec: PrefillSpec | DecodeSpec) -> str:
    """The generated source for `spec` (pure function of the spec and the template)."""
    template = TEMPLATES[spec.kind]
    values = dict(
        template_sha=template_hash(template),
        head_dim=spec.head_dim,
        block_d=spec.block_d,
        group_size=spec.group_size,
        dtype=spec.dtype,
        tl_dtype=TL_DTYPES[spec.dtype],
        block_n=spec.block_n,
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        table_comment=_table_comment(spec.runs),
        **_matmul_values(spec),
    )
    if isinstance(spec, PrefillSpec):
        values.update(block_m=spec.block_m, num_kv_heads=spec.num_kv_heads, dispatch=_prefill_dispatch(spec.runs))
    else:
        parts = tuple((r.start, r.stop, r.retrieval, r.sink, r.window, r.bits) for r in spec.runs)
        values.update(block_g=spec.block_g, parts=repr(parts), kv_group=max(1, spec.kv_group))
    return string.Template(template).substitute(values)


def kernel_name(spec: PrefillSpec | DecodeSpec) -> str:
    return spec.name(template_hash(TEMPLATES[spec.kind]))


def kernel_path(spec: PrefillSpec | DecodeSpec) -> Path:
    return cache_dir() / f"{kernel_name(spec)}.py"


def write_source(spec: PrefillSpec | DecodeSpec) -> Path:
    """Write the generated file (atomically) unless an identical one is already cached."""
    path = kernel_path(spec)
    source = render(spec)
    if path.exists() and path.read_text() == source:
        return path
    try:
        atomic_write(path, source)
    except OutputError as e:
        raise KernelCompileError(f"{e}; set HEADPOLICY_KERNEL_CACHE to a writable directory") from e
    log.info("headpolicy codegen: wrote %s", path)
    return path


def load_kernels(spec: PrefillSpec | DecodeSpec):
    """Import the generated module for `spec` (generating it first if needed); cached per process."""
    if not codegen_enabled():
        raise CodegenDisabledError(
            f"kernel generation is disabled (HEADPOLICY_DISABLE_CODEGEN / codegen.set_enabled(False)); "
            f"cannot build {kernel_name(spec)}. Use the PyTorch path instead: "
            f"headpolicy.codegen.set_backend('reference')"
        )
    name = kernel_name(spec)
    with _lock:
        module = _loaded.get(name)
        if module is not None:
            return module
        try:
            import triton  # noqa: F401  (the generated module needs it; fail here with a clear message)
        except ImportError as e:
            raise KernelCompileError(
                "Triton is not installed: `pip install headpolicy[kernels]`, or use "
                "headpolicy.codegen.set_backend('reference')"
            ) from e
        path = write_source(spec)
        mod_name = f"headpolicy_generated.{name}"
        try:
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module  # triton.jit reads the source through the module
            module_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise KernelCompileError(f"generated kernel {path} failed to import: {type(e).__name__}: {e}") from e
        _loaded[name] = module
        return module


def loaded_kernels() -> list[str]:
    """Names of the generated modules imported in this process."""
    return sorted(_loaded)
