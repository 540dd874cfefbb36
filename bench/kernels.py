"""Attention kernel benchmark: SDPA (full causal), FlexAttention (per-head block mask) and the
generated headpolicy kernels, for prefill and for one decode step, side by side in one run.

    python bench/kernels.py                          # on a GPU: 4K .. 128K context
    python bench/kernels.py --interpret              # anywhere: tiny sizes, Triton interpreter

Decode also reports the memory bandwidth each method achieves (K/V bytes it must read / time)
against the device's peak. Prints a table and writes bench/results/kernels_<device>.json.
Without CUDA the run switches to --interpret by itself: those timings only show that the
benchmark works end to end; the JSON says the GPU numbers are pending.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

# bench/kernels.py would shadow the Hugging Face `kernels` package that transformers imports:
# run as a script, this folder is sys.path[0], so it comes off the path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Peak DRAM bandwidth (bytes/s) by device-name substring; first match wins.
PEAK_BANDWIDTH = [
    ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
    ("L40S", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12), ("RTX 4090", 1.008e12),
]  # fmt: skip


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--interpret", action="store_true", help="tiny sizes under TRITON_INTERPRET=1 (default without CUDA)"
    )
    p.add_argument(
        "--contexts", type=int, nargs="+", help="context lengths (default 4K..128K, or tiny when interpreting)"
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kv-heads", type=int, help="KV heads (default 8; 2 when interpreting)")
    p.add_argument("--group-size", type=int, help="query heads per KV head (default 4; 2 when interpreting)")
    p.add_argument("--head-dim", type=int, help="default 128; 16 when interpreting")
    p.add_argument("--retrieval-frac", type=float, default=0.25, help="fraction of KV heads that keep everything")
    p.add_argument("--sink", type=int, help="default 64; 4 when interpreting")
    p.add_argument("--window", type=int, help="default 1024; 16 when interpreting")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default bfloat16; float32 interpreting")
    p.add_argument("--reps", type=int, help="timed repetitions (median); default 20, 1 when interpreting")
    p.add_argument(
        "--kv-bits",
        type=int,
        nargs="*",
        choices=[8, 4],
        default=[8, 4],
        help="also decode with the retrieval heads quantised to these bits (default 8 4)",
    )
    p.add_argument("--out", type=Path, help="JSON path (default bench/results/kernels_<device>.json)")
    return p.parse_args()


def configure(args) -> dict:
    interpret = args.interpret or not torch.cuda.is_available()
    if not interpret:  # FlexAttention compiles once per shape: two per context, more than dynamo's default limit
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is defined
        # eager FlexAttention (no compile on CPU) warns that it is unfused; expected here
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    tiny = interpret
    pick = lambda value, big, small: value if value is not None else (small if tiny else big)
    return dict(
        interpret=interpret,
        device="cpu" if interpret else "cuda",
        contexts=args.contexts or ([40, 72] if tiny else [4096, 8192, 16384, 32768, 65536, 131072]),
        batch=args.batch,
        kv_heads=pick(args.kv_heads, 8, 2),
        group_size=pick(args.group_size, 4, 2),
        head_dim=pick(args.head_dim, 128, 16),
        retrieval_frac=args.retrieval_frac,
        sink=pick(args.sink, 64, 4),
        window=pick(args.window, 1024, 16),
        dtype=pick(args.dtype, "bfloat16", "float32"),
        reps=pick(args.reps, 20, 1),
        kv_bits=args.kv_bits,
        kv_group=pick(None, 32, 4),  # quantisation group and native residual (the policy defaults on a GPU)
        kv_residual=pick(None, 32, 4),
    )


def head_table(cfg):
    H = cfg["kv_heads"]
    R = max(1, min(H - 1, round(cfg["retrieval_frac"] * H))) if H > 1 else H
    retrieval = [h < R for h in range(H)]
    return R, retrieval, [0 if r else cfg["sink"] for r in retrieval], [1 if r else cfg["window"] for r in retrieval]


def timed(fn, reps: int, device: str) -> float:
    """Median seconds per call (after one warm-up call that also compiles)."""
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_bandwidth(device: str) -> tuple[float | None, str]:
    if device != "cuda":
        return None, "n/a (CPU interpreter)"
    name = torch.cuda.get_device_name()
    for key, bw in PEAK_BANDWIDTH:
        if key in name:
            return bw, f"table ({key})"
    props = torch.cuda.get_device_properties(0)
    clock, bus = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock and bus:  # kHz, bits; double data rate
        return 2 * clock * 1e3 * bus / 8, "from memory clock and bus width"
    return None, "unknown device"


def flex_mask_mod(retrieval, sink, window, group, q_offset):
    """Per-query-head headpolicy rule as a FlexAttention mask_mod (no padding)."""
    ret_t, sink_t, win_t = retrieval, sink, window

    def headpolicy_rule(b, h, q_idx, kv_idx):
        kvh = h // group
        i = q_idx + q_offset
        return (kv_idx <= i) & (ret_t[kvh] | (kv_idx < sink_t[kvh]) | (i - kv_idx < win_t[kvh]))

    return headpolicy_rule


def run_context(cfg, T, methods) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import headpolicy.codegen as codegen

    dev, dtype = cfg["device"], getattr(torch, cfg["dtype"])
    B, H, G, D = cfg["batch"], cfg["kv_heads"], cfg["group_size"], cfg["head_dim"]
    R, retrieval, sink, window = head_table(cfg)
    scale = D**-0.5
    el = torch.tensor([], dtype=dtype).element_size()
    rows = []
    gen = torch.Generator(device=dev).manual_seed(T)
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dtype, generator=gen)
    ret_t = torch.tensor(retrieval, device=dev)
    sink_t, win_t = torch.tensor(sink, device=dev), torch.tensor(window, device=dev)
    flex = torch.compile(flex_attention, dynamic=False) if dev == "cuda" else flex_attention
    # compiled, the block mask is built block by block instead of materialising [B, H, T, T]
    make_block_mask = torch.compile(create_block_mask) if dev == "cuda" else create_block_mask

    def record(phase, method, fn, bytes_read=None, check=None):
        row = dict(phase=phase, context=T, method=method)
        try:
            row["ms"] = timed(fn, cfg["reps"], dev) * 1e3
            if bytes_read is not None:
                row["kv_bytes"] = bytes_read
                row["GBps"] = bytes_read / (row["ms"] / 1e3) / 1e9
            if check is not None:
                row["max_abs_diff_vs_flex"] = float((fn().float() - check.float()).abs().max())
        except Exception as e:  # one failing method (OOM, compile error) must not end the run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        return row

    # --- prefill: S = T fresh tokens ---
    q, k, v = rnd(B, H * G, T, D), rnd(B, H, T, D), rnd(B, H, T, D)
    if "sdpa" in methods:
        record("prefill", "sdpa_full", lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True))  # fmt: skip
    ref = None
    if "flex" in methods:
        bm = make_block_mask(flex_mask_mod(ret_t, sink_t, win_t, G, 0), B, H * G, T, T, device=dev)
        f = lambda: flex(q, k, v, block_mask=bm, scale=scale, enable_gqa=True)
        record("prefill", "flex_block_mask", f)
        ref = f()
    if "generated" in methods:
        with codegen.backend("triton"):
            g = lambda: torch.ops.headpolicy.prefill_attention(q, k, v, None, retrieval, sink, window, scale)
            record("prefill", "generated", g, check=ref)
    q = k = v = ref = None  # free the prefill tensors before decode

    # --- decode: one query at rank T - 1 over T cached tokens ---
    qd = rnd(B, H * G, 1, D)
    kf, vf = rnd(B, H, T, D), rnd(B, H, T, D)
    full_bytes = 2 * B * H * T * D * el
    if "sdpa" in methods:
        record("decode", "sdpa_full", lambda: torch.nn.functional.scaled_dot_product_attention(
            qd, kf, vf, scale=scale, enable_gqa=True), full_bytes)  # fmt: skip
    ref = None
    if "flex" in methods:
        bm = make_block_mask(flex_mask_mod(ret_t, sink_t, win_t, G, T - 1), B, H * G, 1, T, device=dev)
        f = lambda: flex(qd, kf, vf, block_mask=bm, scale=scale, enable_gqa=True)
        kept = R * T + (H - R) * min(T, cfg["sink"] + cfg["window"])  # what it needs, not what it reads
        record("decode", "flex_block_mask", f, 2 * B * kept * D * el)
        ref = f()
    if "generated" in methods:
        s, w = cfg["sink"], cfg["window"]
        ns, nr = min(T, s), min(max(0, T - s), w)
        Hs = H - R
        # the split cache holds the same tokens as kf/vf: retrieval heads whole, streaming heads the
        # first ns tokens plus a ring whose slot (rank - sink) % window holds each of the last nr ranks
        ranks = torch.arange(T - nr, T, device=dev)
        order = torch.empty_like(ranks)
        order[(ranks - s) % max(w, 1)] = ranks
        ring_rank = order.repeat(B, 1)
        slots = torch.cat([torch.arange(ns, device=dev), order])  # the group's one buffer: sink slots, then the ring
        args = (
            qd, torch.full((B,), T - 1, device=dev), kf[:, :R].contiguous(), vf[:, :R].contiguous(), None,
            [kf[:, R:, slots].contiguous()], [vf[:, R:, slots].contiguous()],
            [torch.cat([torch.arange(ns, device=dev).repeat(B, 1), ring_rank], dim=1)], [s], [w], scale,
        )  # fmt: skip
        split_bytes = 2 * B * (R * T + Hs * (ns + nr)) * D * el
        with codegen.backend("triton"):
            record("decode", "generated", lambda: torch.ops.headpolicy.decode_attention(*args), split_bytes, ref)
            for bits in cfg["kv_bits"]:  # the same split cache with its retrieval heads stored as codes
                qargs, qbytes = quantized_decode_args(args, kf[:, :R], vf[:, :R], bits, cfg, split_bytes, el)
                run_q = lambda a=qargs: torch.ops.headpolicy.decode_attention_quantized(*a)
                record("decode", f"generated_int{bits}", run_q, qbytes, ref)
    return rows


def quantized_decode_args(args, k_ret, v_ret, bits, cfg, split_bytes, el):
    """decode_attention's arguments with the retrieval heads as one quantised part (KIVI layout: keys
    per channel, values per token, groups of kv_group, the last kv_residual..+group tokens kept in the
    model's dtype), and the bytes that cache holds."""
    from headpolicy.policies.precision import quantize, quantized_tokens

    qd, q_rank, _, _, _, gk, gv, gr, gs, gw, scale = args
    B, R, T, D = k_ret.shape
    group = cfg["kv_group"]
    n = quantized_tokens(T, group, cfg["kv_residual"])
    rank = torch.arange(T, device=qd.device).repeat(B, 1)
    qk = quantize(k_ret[:, :, :n], bits, group, per_channel=True)
    qv = quantize(v_ret[:, :, :n], bits, group, per_channel=False)
    tail_k, tail_v = k_ret[:, :, n:].contiguous(), v_ret[:, :, n:].contiguous()
    part = [*qk.tensors(), *qv.tensors(), rank[:, :n], tail_k, tail_v, rank[:, n:]]
    empty = k_ret[:, :0]
    quant_args = (qd, q_rank, empty, empty, None, gk, gv, gr, gs, gw, part, [True], [bits], [0], [1], group,
                  scale)  # fmt: skip
    stored = sum(t.numel() * t.element_size() for t in part if t.dtype != torch.long)
    return quant_args, split_bytes - 2 * B * R * T * D * el + stored


def main():
    args = parse_args()
    cfg = configure(args)
    dev = cfg["device"]
    device_name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({platform.machine() or 'unknown'})"
    peak, peak_source = peak_bandwidth(dev)
    tag = "interpret" if cfg["interpret"] else re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    out = args.out or RESULTS / f"kernels_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    methods = ["sdpa", "flex", "generated"]
    rows = []
    for T in cfg["contexts"]:
        print(f"context {T} ...", file=sys.stderr, flush=True)
        new = run_context(cfg, T, methods)
        for r in new:
            if peak and "GBps" in r:
                r["frac_of_peak"] = r["GBps"] * 1e9 / peak
        rows += new
        if dev == "cuda":
            torch.cuda.empty_cache()
        # after every context, so that a run stopped at a time limit keeps what it measured
        write_report(out, rows, cfg, device_name, peak, peak_source, done=T == cfg["contexts"][-1])
    print_table(rows, cfg, device_name, peak)
    print(f"wrote {out}")


def write_report(out, rows, cfg, device_name, peak, peak_source, *, done: bool) -> None:
    gpu = cfg["device"] == "cuda"
    measured = sorted({r["context"] for r in rows})
    report = dict(
        benchmark="bench/kernels.py",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        device=device_name,
        peak_bandwidth_Bps=peak,
        peak_bandwidth_source=peak_source,
        gpu_numbers="measured" if gpu else "pending",
        complete=done,
        notes=(
            f"GPU timings at contexts {measured}."
            if gpu
            else "No GPU was available: tiny shapes under the Triton interpreter (TRITON_INTERPRET=1) only "
            "prove the benchmark and the kernels run end to end; the times say nothing about GPU speed. "
            "GPU numbers are pending: run `python bench/kernels.py` on a CUDA machine."
        ),
        config=cfg,
        columns=dict(
            ms="median time per call",
            kv_bytes="K/V bytes the method must read: SDPA the whole cache; FlexAttention and the generated "
            "kernels the retrieval heads whole plus sink + window tokens of streaming heads; generated_intN "
            "the same with retrieval heads as N-bit codes plus float16 scales/zeros and a native residual",
            GBps="kv_bytes / time",
            frac_of_peak="GBps / the device's peak DRAM bandwidth",
            max_abs_diff_vs_flex="output vs FlexAttention with the same per-head block mask (for generated_intN "
            "this includes the quantisation error)",
        ),
        torch=torch.__version__,
        rows=rows,
    )
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)


def print_table(rows, cfg, device_name, peak):
    print(f"\nheadpolicy attention kernels on {device_name} ({cfg['dtype']}, B={cfg['batch']}, "
          f"Hkv={cfg['kv_heads']} x G={cfg['group_size']}, D={cfg['head_dim']}, sink={cfg['sink']}, "
          f"window={cfg['window']}, retrieval frac={cfg['retrieval_frac']})")  # fmt: skip
    if cfg["interpret"]:
        print("INTERPRETER RUN: times are not GPU performance; GPU numbers pending")
    head = f"{'phase':8} {'context':>8} {'method':16} {'ms':>10} {'x sdpa':>7} {'GB/s':>9} {'% peak':>7}  note"
    print(head)
    print("-" * len(head))
    sdpa = {(r["phase"], r["context"]): r.get("ms") for r in rows if r["method"] == "sdpa_full"}
    for r in rows:
        base = sdpa.get((r["phase"], r["context"]))
        speed = f"{base / r['ms']:7.2f}" if base and r.get("ms") else f"{'':7}"
        gbps = f"{r['GBps']:9.1f}" if "GBps" in r else f"{'':9}"
        frac = f"{100 * r['frac_of_peak']:6.1f}%" if "frac_of_peak" in r else f"{'':7}"
        ms = f"{r['ms']:10.3f}" if "ms" in r else f"{'-':>10}"
        note = r.get("error", "")
        if "max_abs_diff_vs_flex" in r:
            note = f"max|diff| vs flex {r['max_abs_diff_vs_flex']:.2e}"
        print(f"{r['phase']:8} {r['context']:8d} {r['method']:16} {ms} {speed} {gbps} {frac}  {note}")
    if peak:
        print(f"peak bandwidth {peak / 1e12:.2f} TB/s")


if __name__ == "__main__":
    main()
