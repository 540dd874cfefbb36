"""CLI: `headpolicy generate` — run a model with (or without) a policy and report the KV cache."""

from __future__ import annotations

import argparse
import sys
import time

from headpolicy.cli import command


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="alias (smollm2-135m), checkpoint directory, or .gguf file")
    p.add_argument("--policy", help="policy YAML to apply (default: run the unmodified model)")
    p.add_argument("--prompt", help="prompt text (default: read standard input)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-fingerprint-check", action="store_true", help="apply a policy made for other weights")


@command("generate", help="greedy-generate with a policy applied and report the KV cache size", configure=_configure)
def run_generate(args: argparse.Namespace) -> int:
    import torch

    from headpolicy import HeadPolicy, SplitKVCache, apply, load_model

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    # A checkpoint's attached policy applies unless --policy names another one.
    model, tok = load_model(args.model, apply_policy=not args.policy)
    if args.policy:
        apply(model, HeadPolicy.load(args.policy), check_fingerprint=not args.no_fingerprint_check)
    cache = SplitKVCache.for_model(model) if getattr(model, "_headpolicy", None) else None
    enc = tok(prompt, return_tensors="pt")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            past_key_values=cache,
            pad_token_id=tok.pad_token_id,
        )
    dt = time.perf_counter() - t0
    print(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    if cache is not None:
        print(f"[kv cache: {cache.kv_bytes() / 2**20:.2f} MiB, {dt:.1f}s]", file=sys.stderr)
    return 0
