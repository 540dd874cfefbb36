"""KV cache memory and decode speed: full cache vs a hand-written policy, side by side.

SmolLM2-135M at 1K/2K/4K context. The policy keeps KV head 0 of every layer as a
retrieval head (1 of 3) and makes the others streaming heads with sink 64 + window 256.
For each context, full and policy runs alternate (`--repeats` times, median taken) so both
see the same machine load. KV bytes are read from the caches themselves and checked
against the formula retrieval * T + streaming * min(T, sink + window).

    python bench/kv_memory.py [--contexts 1024 2048 4096] [--new-tokens 32] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from headpolicy import HeadPolicy, Provenance, SplitKVCache, apply, describe_model, load_model

RESULTS = Path(__file__).parent / "results"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def prompt_ids(tok, n_tokens: int) -> torch.Tensor:
    """A passkey haystack of exactly n_tokens tokens (content matters little for memory/speed)."""
    needle = "The pass key is 71432. Remember it. 71432 is the pass key. "
    text = FILLER * (n_tokens // 20 + 8)
    mid = len(text) // 2
    ids = tok(text[:mid] + needle + text[mid:], return_tensors="pt")["input_ids"]
    return ids[:, :n_tokens]


def dynamic_cache_bytes(cache: DynamicCache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.no_grad()
def run(model, ids: torch.Tensor, cache, new_tokens: int) -> dict:
    """Prefill, then greedy-decode `new_tokens` one at a time; time both phases."""
    t0 = time.perf_counter()
    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    tok = out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        out = model(tok, cache=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_tok_s": new_tokens / (t2 - t1)}


def hand_policy(model) -> HeadPolicy:
    info = describe_model(model)
    keep = [[h == 0 for h in range(info.num_kv_heads)] for _ in range(info.num_layers)]
    prov = Provenance(method="hand", settings={"rule": "KV head 0 of every layer is retrieval"})
    return HeadPolicy.from_kinds(info, keep, sink=64, window=256, provenance=prov)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "kv_memory_cpu.json")
    ap.add_argument(
        "--threads", type=int, default=None,
        help="torch intra-op threads for both sides (default: torch's choice); use 1 on a shared, loaded machine",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    full, tok = load_model(args.model)
    policy = hand_policy(full)
    applied = apply(copy.deepcopy(full), policy)
    esize = next(full.parameters()).element_size()
    load_before = os.getloadavg()

    rows = []
    for ctx in args.contexts:
        ids = prompt_ids(tok, ctx)
        T = ids.shape[1] + args.new_tokens
        runs = {"full": [], "policy": []}
        for _ in range(args.repeats):
            full_cache, split_cache = DynamicCache(), SplitKVCache.for_model(applied)
            runs["full"].append(run(full, ids, full_cache, args.new_tokens))
            runs["policy"].append(run(applied, ids, split_cache, args.new_tokens))
        full_bytes, policy_bytes = dynamic_cache_bytes(full_cache), split_cache.kv_bytes()
        formula = policy.kv_bytes(T, dtype_bytes=esize)
        med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
        rows.append(
            {
                "context": ctx,
                "tokens_cached": T,
                "kv_bytes_full": full_bytes,
                "kv_bytes_policy": policy_bytes,
                "kv_bytes_formula": formula,
                "kv_ratio_full_over_policy": full_bytes / policy_bytes,
                "kv_fraction": policy_bytes / full_bytes,
                "formula_matches": policy_bytes == formula and full_bytes == policy.full_kv_bytes(T, dtype_bytes=esize),
                "decode_tok_s_full": med["full"]["decode_tok_s"],
                "decode_tok_s_policy": med["policy"]["decode_tok_s"],
                "decode_speedup": med["policy"]["decode_tok_s"] / med["full"]["decode_tok_s"],
                "prefill_s_full": med["full"]["prefill_s"],
                "prefill_s_policy": med["policy"]["prefill_s"],
            }
        )
        print_row(rows[-1], header=len(rows) == 1)

    result = {
        "benchmark": "kv_memory",
        "model": describe_model(full).name,
        "policy": {
            "retrieval_heads": policy.num_retrieval,
            "kv_heads": policy.num_heads,
            "sink": policy.sink,
            "window": policy.window,
        },
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "device": "cpu",
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all(r["formula_matches"] for r in rows) else 1


def print_row(r: dict, header: bool) -> None:
    if header:
        print(
            f"{'context':>7} | {'KV full MiB':>11} | {'KV policy MiB':>13} | {'ratio':>5} | {'formula':>7} | "
            f"{'decode tok/s full':>17} | {'policy':>6} | {'speedup':>7} | {'prefill s full':>14} | {'policy':>6}"
        )
    mib = 2**20
    print(
        f"{r['context']:>7} | {r['kv_bytes_full'] / mib:>11.2f} | {r['kv_bytes_policy'] / mib:>13.2f} | "
        f"{r['kv_ratio_full_over_policy']:>5.2f} | {'ok' if r['formula_matches'] else 'MISMATCH':>7} | "
        f"{r['decode_tok_s_full']:>17.2f} | {r['decode_tok_s_policy']:>6.2f} | {r['decode_speedup']:>7.2f} | "
        f"{r['prefill_s_full']:>14.2f} | {r['prefill_s_policy']:>6.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
