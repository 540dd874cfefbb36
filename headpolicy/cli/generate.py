"""`headpolicy generate MODEL [--policy FILE] --prompt TEXT`: greedy generation, and the KV cache it took."""

from __future__ import annotations

import argparse
import sys
import time

from headpolicy.cli import command
from headpolicy.cli.args import add_model, add_no_fingerprint_check


def _configure(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--policy", help="policy YAML to apply (default: the checkpoint's attached one, else none)")
    p.add_argument("--prompt", help="prompt text (default: read standard input)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    add_no_fingerprint_check(p, "apply")


@command("generate", help="greedy-generate with a policy applied and report the KV cache size", configure=_configure)
def run_generate(args: argparse.Namespace) -> int:
    from headpolicy.policies.schema import HeadPolicy
    from headpolicy.runtime.apply import apply
    from headpolicy.runtime.checkpoint import load_model
    from headpolicy.runtime.generate import cache_bytes, generate

    # Read the policy before the model: a bad file fails in milliseconds, not after the model loads.
    policy = HeadPolicy.load(args.policy) if args.policy else None
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    # A checkpoint's attached policy applies unless --policy names another one.
    model, tok = load_model(args.model, apply_policy=policy is None)
    if policy is not None:
        apply(model, policy, check_fingerprint=not args.no_fingerprint_check)
    enc = tok(prompt, return_tensors="pt")
    t0 = time.perf_counter()
    gen = generate(model, enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=args.max_new_tokens,
                   pad_token_id=tok.pad_token_id)  # fmt: skip
    dt = time.perf_counter() - t0
    print(tok.decode(gen.tokens[0], skip_special_tokens=True))
    print(f"[kv cache: {cache_bytes(gen.cache) / 2**20:.2f} MiB, {dt:.1f}s]", file=sys.stderr)
    return 0
