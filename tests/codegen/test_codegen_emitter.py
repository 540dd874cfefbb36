"""The emitter: names, readable sources, the on-disk cache, the disable switch."""

import ast
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from codegen_helpers import has_triton

import headpolicy.codegen as codegen
from headpolicy.codegen import emitter
from headpolicy.codegen.spec import DecodeSpec, PrefillSpec, head_runs
from headpolicy.errors import CodegenDisabledError, KernelCompileError

RUNS = head_runs([True, True, False, False], [0, 0, 4, 4], [1, 1, 8, 8])
PREFILL = PrefillSpec(head_dim=64, group_size=4, runs=RUNS, dtype="f16", block_m=64, block_n=32)
DECODE = DecodeSpec(
    head_dim=128, group_size=2, num_retrieval=2, groups=((2, 4, 8), (1, 0, 16)), dtype="bf16", block_n=64
)


def test_head_runs_compress_the_table_and_reject_bad_rows():
    assert [r.tag for r in RUNS] == ["r2", "s4w8x2"]
    assert [r.tag for r in head_runs([False, True, False], [2, 0, 2], [3, 1, 3])] == ["s2w3x1", "r1", "s2w3x1"]
    with pytest.raises(ValueError, match="equal, non-zero lengths"):
        head_runs([True], [0, 0], [1])
    with pytest.raises(ValueError, match="KV head 1: streaming heads need"):
        head_runs([True, False], [0, 2], [1, 0])


def test_names_are_filename_safe_and_spell_every_parameter():
    name = emitter.kernel_name(PREFILL)
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", name), name
    for part in ["prefill", "d64", "g4", "r2-s4w8x2", "f16", "bm64", "bn32", "w4", "st2"]:
        assert part in name, (part, name)
    assert name.endswith(emitter.template_hash(emitter.TEMPLATES["prefill"]))
    variants = [
        replace(PREFILL, head_dim=128), replace(PREFILL, group_size=2), replace(PREFILL, dtype="bf16"),
        replace(PREFILL, block_m=128), replace(PREFILL, block_n=64), replace(PREFILL, num_warps=8),
        replace(PREFILL, num_stages=3), replace(PREFILL, upcast_matmul=True),
        replace(PREFILL, runs=head_runs([True, False, False, False], [0, 4, 4, 4], [1, 8, 8, 8])),
        replace(PREFILL, runs=head_runs([True, True, False, False], [0, 0, 4, 4], [1, 1, 9, 9])),
    ]  # fmt: skip
    names = {emitter.kernel_name(s) for s in [PREFILL, *variants]}
    assert len(names) == 1 + len(variants)
    dname = emitter.kernel_name(DECODE)
    for part in ["decode", "d128", "g2", "r2-s4w8x2-s0w16x1", "bf16", "bn64"]:
        assert part in dname, (part, dname)


def test_long_irregular_tables_keep_short_names():
    n = 64
    runs = head_runs([h % 2 == 0 for h in range(n)], [h for h in range(n)], [h + 100 for h in range(n)])
    name = emitter.kernel_name(replace(PREFILL, runs=runs))
    assert len(name) < 200 and "t64runs" in name


def test_template_change_changes_the_name(monkeypatch):
    before = emitter.kernel_name(PREFILL)
    monkeypatch.setitem(emitter.TEMPLATES, "prefill", emitter.TEMPLATES["prefill"] + "\n# edited\n")
    assert emitter.kernel_name(PREFILL) != before


@pytest.mark.parametrize("spec", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_rendered_source_is_readable_python(spec):
    src = emitter.render(spec)
    compile(src, "generated.py", "exec")  # valid Python (Triton parses the jit bodies later)
    header = src.split("import triton")[0]
    assert "rank = slot - pad[b]" in header or "rank qr[b]" in header
    assert "j >= 0" in header and "window" in header
    assert "KV heads [0, 2): retrieval" in header
    assert "KV heads [2, 4): streaming sink=4 window=8" in header
    assert f"head_dim={spec.head_dim}" in header and f"dtype={spec.dtype}" in header
    assert "$" not in src  # every placeholder was filled


def test_prefill_dispatch_bakes_the_table_in():
    src = emitter.render(PREFILL)
    assert "if h < 2:" in src and "_retrieval_head(" in src
    assert re.search(r"else:.*\n\s+acc, m_i, l_i = _streaming_head\(.*, 4, 8, TRACE\)", src)


def test_codegen_never_imports_triton_at_module_level():
    for path in Path(codegen.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = [a.name for a in getattr(node, "names", [])] + [getattr(node, "module", None) or ""]
            assert not any(n.split(".")[0] == "triton" for n in names), f"{path.name} imports triton at import time"


@pytest.mark.skipif(not has_triton(), reason="triton is not installed")
def test_load_writes_once_and_imports_once(_kernel_cache, monkeypatch):
    spec = replace(PREFILL, head_dim=16, block_m=16, block_n=16)
    module = emitter.load_kernels(spec)
    path = emitter.kernel_path(spec)
    assert path.parent == _kernel_cache and path.exists()
    assert emitter.load_kernels(spec) is module  # once per process
    assert emitter.kernel_name(spec) in emitter.loaded_kernels()
    stat = path.stat()
    monkeypatch.setattr(emitter, "_loaded", {})  # a new process: the cached file is reused as is
    again = emitter.load_kernels(spec)
    assert again is not module and hasattr(again, "prefill_kernel")
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_ino == stat.st_ino


def test_disable_switch_raises_a_clear_error(monkeypatch):
    monkeypatch.setenv("HEADPOLICY_DISABLE_CODEGEN", "1")
    assert not codegen.codegen_enabled()
    with pytest.raises(CodegenDisabledError, match="HEADPOLICY_DISABLE_CODEGEN.*set_backend\\('reference'\\)"):
        emitter.load_kernels(PREFILL)
    monkeypatch.delenv("HEADPOLICY_DISABLE_CODEGEN")
    codegen.set_enabled(False)
    try:
        with pytest.raises(CodegenDisabledError), codegen.backend("triton"):
            q = torch.randn(1, 2, 3, 16)
            torch.ops.headpolicy.prefill_attention(q, q, q, None, [True, False], [0, 1], [1, 2], 1.0)
        with codegen.backend("reference"):  # the PyTorch path never needs codegen
            out = torch.ops.headpolicy.prefill_attention(q, q, q, None, [True, False], [0, 1], [1, 2], 1.0)
        assert out.shape == q.shape
    finally:
        codegen.set_enabled(None)


def test_unwritable_cache_is_a_named_error(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("HEADPOLICY_KERNEL_CACHE", str(blocker / "sub"))
    with pytest.raises(KernelCompileError, match="HEADPOLICY_KERNEL_CACHE"):
        emitter.write_source(PREFILL)
