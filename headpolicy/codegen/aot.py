"""Compile the generated kernels for a CUDA target without a GPU (Triton -> TTIR -> PTX -> cubin).

The interpreter checks what a kernel computes; this checks that the real compiler accepts it,
and reports its shared-memory use. Must run without TRITON_INTERPRET=1.

    python -m headpolicy.codegen.aot --arch 90 --dtype f16 --head-dim 128
"""

from __future__ import annotations

import argparse
import inspect

from headpolicy.codegen.emitter import load_kernels
from headpolicy.codegen.spec import DecodeSpec, PrefillSpec, head_runs

_PTR = {"f16": "*fp16", "bf16": "*bf16", "f32": "*fp32"}


def _signature(fn, types: dict[str, str], constexprs: dict) -> dict[str, str]:
    params = inspect.signature(fn.fn).parameters
    return {p: "constexpr" if p in constexprs else types.get(p, "i32") for p in params}


def _compile(fn, types, constexprs, target, num_warps, num_stages) -> dict:
    import triton
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=_signature(fn, types, constexprs), constexprs=constexprs)
    kernel = triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))
    return dict(shared_bytes=kernel.metadata.shared, num_warps=num_warps, num_stages=num_stages)


def compile_for_target(
    spec: PrefillSpec | DecodeSpec, arch: int = 90, warp_size: int = 32, trace: bool = True
) -> dict[str, dict]:
    """Compile every kernel (and constexpr variant) of `spec` for sm_<arch>; returns metadata per variant."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", arch, warp_size)
    mod = load_kernels(spec)
    ptr = _PTR[spec.dtype]
    w, s = spec.num_warps, spec.num_stages
    out = {}
    if isinstance(spec, PrefillSpec):
        types = dict(Q=ptr, K=ptr, V=ptr, O=ptr, PAD="*i32", TRACE_BUF="*i32", qk_scale="fp32")
        for flag in (False, True) if trace else (False,):
            out[f"prefill_kernel[TRACE={flag}]"] = _compile(mod.prefill_kernel, types, {"TRACE": flag}, target, w, s)
        return out
    types = dict(Q=ptr, K=ptr, V=ptr, QRANK="*i64", R="*i64", O_PART="*fp32", LSE_PART="*fp32", qk_scale="fp32")
    for run in spec.runs:
        consts = dict(HAS_RANK=not run.retrieval, IS_RETRIEVAL=run.retrieval, SINK=run.sink, WINDOW=max(1, run.window))
        out[f"decode_split_kernel[{run.tag}]"] = _compile(mod.decode_split_kernel, types, consts, target, w, s)
    types = dict(O_PART="*fp32", LSE_PART="*fp32", OUT=ptr)
    out["decode_combine_kernel"] = _compile(mod.decode_combine_kernel, types, {"BLOCK_S": 8}, target, 1, s)
    return out


def main(argv=None) -> None:
    from headpolicy.codegen.kernels import default_blocks

    p = argparse.ArgumentParser(description="compile headpolicy kernels for a CUDA arch without a GPU")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", choices=sorted(_PTR), default="f16")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="one streaming group, no TRACE build (for tests)")
    a = p.parse_args(argv)
    cfg = default_blocks(a.head_dim, "cuda", a.dtype)
    runs = head_runs([True, False, False], [0, 64, 4], [1, 1024, 256])
    groups = ((1, 64, 1024), (1, 4, 256))
    num_retrieval = 1
    if a.quick:  # the prefill kernel, one streaming decode part and the combine kernel
        runs, groups, num_retrieval = runs[:2], groups[:1], 0
    shape = dict(head_dim=a.head_dim, group_size=a.group_size, dtype=a.dtype)
    decode_cfg = dict(block_n=cfg["block_n"], num_warps=min(4, cfg["num_warps"]), num_stages=cfg["num_stages"])
    specs = [
        PrefillSpec(runs=runs, **shape, **cfg),
        DecodeSpec(num_retrieval=num_retrieval, groups=groups, **shape, **decode_cfg),
    ]
    for spec in specs:
        for name, meta in compile_for_target(spec, a.arch, trace=not a.quick).items():
            print(f"sm_{a.arch} {spec.kind:7} {name:40} shared={meta['shared_bytes']:>7} B  warps={meta['num_warps']}")


if __name__ == "__main__":
    main()
