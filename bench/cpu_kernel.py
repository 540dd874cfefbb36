"""The CPU decode kernel for quantised parts (headpolicy/codegen/cpu.py) against PyTorch, side by side.

One decode step of one layer's quantised retrieval group, SmolLM2-135M shapes by default (3 KV
heads x 3 query heads, head dim 64, groups of 32, a 32-token full-precision tail), at several
contexts and int8 / int4, every method on the same data in one run:

    sdpa_fp32         SDPA over the same tokens kept in float32 (what a native head costs)
    dequant_sdpa      dequantise the codes into a buffer, then SDPA (the PyTorch fallback)
    c_kernel          decode_prepared: the C kernel over the codes (buffer prepared once)

    python bench/cpu_kernel.py                      # contexts 1K-8K, 1 thread
    python bench/cpu_kernel.py --threads 2 --contexts 4096

Timings are the best of --repeats rounds of --calls calls (ms a call); the C kernel's
largest difference from SDPA over the dequantised values is printed beside it. Writes
bench/results/cpu_kernel_<machine>.json and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from headpolicy.codegen import cpu  # noqa: E402
from headpolicy.io import write_json  # noqa: E402
from headpolicy.policies.precision import quantize  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def best_ms(fn, calls: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return min(times) * 1e3


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure(context: int, bits: int, args) -> dict:
    B, H, G, D, tail = 1, args.kv_heads, args.queries_per_kv, args.head_dim, args.tail
    N = context - tail - (context - tail) % args.group  # whole key groups, the rest in the tail
    g = torch.Generator().manual_seed(context + bits)
    k, v = (torch.randn(B, H, context, D, generator=g) for _ in range(2))
    q = torch.randn(B, H * G, 1, D, generator=g)
    qk = quantize(k[:, :, :N], bits, args.group, per_channel=True)
    qv = quantize(v[:, :, :N], bits, args.group, per_channel=False)
    k_tail, v_tail = k[:, :, N:].contiguous(), v[:, :, N:].contiguous()
    scale = D**-0.5
    prepared = cpu.prepare(qk, qv, G)
    if prepared is None:
        raise SystemExit("the C kernel does not build here (no C compiler, or HEADPOLICY_DISABLE_CODEGEN)")

    def dequant_sdpa():
        keys = torch.cat([qk.dequantize(), k_tail], 2)
        values = torch.cat([qv.dequantize(), v_tail], 2)
        return F.scaled_dot_product_attention(q.view(B, H, G, D), keys, values, scale=scale)

    def c_kernel():
        return cpu.decode_prepared(q, prepared, N, k_tail, v_tail, scale)

    def sdpa_fp32():
        return F.scaled_dot_product_attention(q.view(B, H, G, D), k, v, scale=scale)

    error = (c_kernel() - dequant_sdpa().reshape(B, H * G, 1, D)).abs().max().item()
    row = {"context": context, "bits": bits, "max_abs_diff": error}
    for name, fn in (("sdpa_fp32", sdpa_fp32), ("dequant_sdpa", dequant_sdpa), ("c_kernel", c_kernel)):
        row[name + "_ms"] = best_ms(fn, args.calls, args.repeats)
    row["c_kernel_vs_sdpa_fp32"] = row["sdpa_fp32_ms"] / row["c_kernel_ms"]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--queries-per-kv", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--tail", type=int, default=32)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(c, bits, args) for c in args.contexts for bits in (8, 4)]
    print(f"CPU decode kernel, {cpu_name()}, {args.threads} thread(s): {args.kv_heads} KV heads x "
          f"{args.queries_per_kv} queries, head dim {args.head_dim}, group {args.group} (ms a call)")  # fmt: skip
    header = ("context", 7), ("bits", 4), ("sdpa fp32", 10), ("dequant+sdpa", 13), ("C kernel", 9), ("vs fp32", 8)
    print(" ".join(f"{name:>{width}}" for name, width in header), f"{'max diff':>9}")
    for r in rows:
        print(f"{r['context']:>7} {r['bits']:>4} {r['sdpa_fp32_ms']:>10.3f} {r['dequant_sdpa_ms']:>13.3f} "
              f"{r['c_kernel_ms']:>9.3f} {r['c_kernel_vs_sdpa_fp32']:>7.2f}x {r['max_abs_diff']:>9.1e}")  # fmt: skip
    out = args.out or RESULTS / f"cpu_kernel_{platform.machine()}.json"
    write_json(out, {"benchmark": "cpu_kernel", "cpu": cpu_name(), "threads": args.threads,
                     "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows})  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
