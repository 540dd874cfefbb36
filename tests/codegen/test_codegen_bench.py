"""bench/kernels.py runs end to end at tiny sizes under the interpreter (numbers are not checked)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from codegen_helpers import INTERPRET, has_triton

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


@pytest.mark.skipif(not (INTERPRET and has_triton()), reason="needs triton with TRITON_INTERPRET=1 (CPU run)")
def test_kernel_bench_runs_under_the_interpreter(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "kernels.json"
    monkeypatch.setattr(sys, "argv", ["kernels.py", "--interpret", "--contexts", "21", "--out", str(out)])
    bench.main()
    report = json.loads(out.read_text())
    assert report["gpu_numbers"] == "pending"
    methods = {(r["phase"], r["method"]) for r in report["rows"] if "ms" in r}
    expected = {(p, m) for p in ("prefill", "decode") for m in ("sdpa_full", "flex_block_mask", "generated")}
    assert methods == expected | {("decode", "generated_int8"), ("decode", "generated_int4")}
    rows = {(r["phase"], r["method"]): r for r in report["rows"]}
    generated = [r for r in report["rows"] if r["method"] == "generated"]
    assert all(r["max_abs_diff_vs_flex"] < 1e-4 for r in generated)  # same semantics as the block mask
    # quantised retrieval heads: close to the block mask, and fewer bytes than the native split cache
    assert rows["decode", "generated_int8"]["max_abs_diff_vs_flex"] < 0.05
    assert rows["decode", "generated_int4"]["max_abs_diff_vs_flex"] < 0.5
    kv = {m: rows["decode", m]["kv_bytes"] for m in ("generated", "generated_int8", "generated_int4")}
    assert kv["generated"] > kv["generated_int8"] > kv["generated_int4"]
    assert "GPU numbers pending" in capsys.readouterr().out
