"""Prefill time and decode tokens/s: PyTorch eager (full / policy) vs ONNX Runtime (full / policy).

    python bench/export.py [--model smollm2-135m] [--policy FILE] [--lengths 2048 4096] [--decode 32]

All four run side by side in one process on the same prompt; "full" for ONNX is the same
export pipeline with every head retrieval (layers stay on native attention). Without
--policy, a hand policy is used: KV head 0 of every layer retrieval, sink 64, window 256.
Writes bench/results/export_<model>_<provider>.json and prints a table. Not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# bench/kernels.py would shadow the Hugging Face `kernels` package that transformers imports:
# run as a script, this folder is sys.path[0], so it comes off the path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import headpolicy  # noqa: E402
from headpolicy import HeadPolicy, SplitKVCache, describe_model  # noqa: E402
from headpolicy.passes.artifact import export_artifact  # noqa: E402
from headpolicy.runtime.onnx import OnnxRunner  # noqa: E402


def hand_policy(model, sink: int, window: int) -> HeadPolicy:
    info = describe_model(model)
    table = [[h == 0 for h in range(info.num_kv_heads)] for _ in range(info.num_layers)]
    return HeadPolicy.from_kinds(info, table, sink=sink, window=window)


def full_policy(model) -> HeadPolicy:
    info = describe_model(model)
    return HeadPolicy.from_kinds(info, [[True] * info.num_kv_heads] * info.num_layers)


@torch.no_grad()
def run_torch(model, ids: torch.Tensor, n_decode: int, cache) -> dict:
    t0 = time.perf_counter()
    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - t0
    cache, tok, steps = out.past_key_values, out.logits[:, -1:].argmax(-1), []
    for _ in range(n_decode):
        t0 = time.perf_counter()
        out = model(tok, cache=cache, use_cache=True)
        steps.append(time.perf_counter() - t0)
        tok = out.logits[:, -1:].argmax(-1)
    kv = (
        cache.kv_bytes()
        if hasattr(cache, "kv_bytes")
        else sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    )
    return {"prefill_s": prefill, "decode_tok_s": 1.0 / statistics.median(steps), "kv_bytes": int(kv)}


def run_onnx(runner: OnnxRunner, ids: torch.Tensor, n_decode: int) -> dict:
    t0 = time.perf_counter()
    logits, cache = runner.prefill(ids.numpy())
    prefill = time.perf_counter() - t0
    pos, steps = ids.shape[1], []
    for _ in range(n_decode):
        t0 = time.perf_counter()
        logits, cache = runner.decode(int(np.argmax(logits)), pos, cache)
        steps.append(time.perf_counter() - t0)
        pos += 1
    return {"prefill_s": prefill, "decode_tok_s": 1.0 / statistics.median(steps), "kv_bytes": runner.cache_bytes(cache)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policy", help="policy YAML (default: hand policy, see module docstring)")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--decode", type=int, default=32, help="decode steps timed per length")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--provider", default=None, help="cpu | cuda (default: cuda if onnxruntime-gpu sees a GPU)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    base, _ = headpolicy.load_model(args.model)
    policy = HeadPolicy.load(args.policy) if args.policy else hand_policy(base, args.sink, args.window)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        full_dir = export_artifact(base, full_policy(base), "onnx", Path(tmp) / "full")
        policy_dir = export_artifact(base, policy, "onnx", Path(tmp) / "policy")
        export_s = time.perf_counter() - t0
        runners = {
            "onnx full": OnnxRunner(full_dir, args.provider, threads=args.threads),
            "onnx policy": OnnxRunner(policy_dir, args.provider, threads=args.threads),
        }
        provider = runners["onnx full"].provider
        with_policy = headpolicy.apply(copy.deepcopy(base), policy)

        rows = []
        vocab = base.config.vocab_size
        for length in [64, *args.lengths]:  # 64: warm-up, not reported
            ids = torch.randint(100, vocab - 100, (1, length), generator=torch.Generator().manual_seed(length))
            configs = {
                "torch eager full": lambda x: run_torch(base, x, args.decode, None),
                "torch policy": lambda x: run_torch(with_policy, x, args.decode, SplitKVCache.for_model(with_policy)),
                "onnx full": lambda x: run_onnx(runners["onnx full"], x, args.decode),
                "onnx policy": lambda x: run_onnx(runners["onnx policy"], x, args.decode),
            }
            for name, fn in configs.items():
                r = fn(ids)
                if length == 64:
                    continue
                rows.append({"config": name, "length": length, **r})
                print(
                    f"{name:18s} {length:6d}  prefill {r['prefill_s']:7.2f} s  decode {r['decode_tok_s']:7.2f} tok/s"
                    f"  kv {r['kv_bytes'] / 2**20:8.2f} MiB",
                    flush=True,
                )

    result = {
        "model": args.model,
        "policy": {
            "retrieval": policy.num_retrieval,
            "heads": policy.num_heads,
            "sink": policy.sink,
            "window": policy.window,
            "source": args.policy or "hand: KV head 0 of every layer",
        },
        "onnx_provider": provider,
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.platform(),
        "load_average_at_end": os.getloadavg(),  # the CPU may be shared: high load = noisy times
        "decode_steps": args.decode,
        "onnx_export_s": export_s,
        "scope": "batch 1, no padding; greedy; prefill timed once, decode = median step",
        "rows": rows,
    }
    out = (
        Path(args.out)
        / f"export_{args.model.replace('/', '_')}_{provider.replace('ExecutionProvider', '').lower()}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{'config':18s} {'len':>6s} {'prefill s':>10s} {'decode tok/s':>13s} {'KV MiB':>9s}")
    for r in rows:
        print(
            f"{r['config']:18s} {r['length']:6d} {r['prefill_s']:10.2f} {r['decode_tok_s']:13.2f} "
            f"{r['kv_bytes'] / 2**20:9.2f}"
        )
    print(f"[onnx provider: {provider}; wrote {out}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
