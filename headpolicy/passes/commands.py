"""CLI: `headpolicy export MODEL --policy FILE --format {pt2,onnx} -o OUT`."""

from __future__ import annotations

import argparse
import sys
import time

from headpolicy.cli import command


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="alias (smollm2-135m), checkpoint directory, or .gguf file")
    p.add_argument("--policy", required=True, help="policy YAML to compile into the graph")
    p.add_argument("--format", choices=("pt2", "onnx"), default="onnx", help="pt2: one archive; onnx: a folder")
    p.add_argument("-o", "--output", required=True, help="output .pt2 file or ONNX folder")
    p.add_argument("--no-fingerprint-check", action="store_true", help="export a policy made for other weights")


@command(
    "export", help="export the policy-rewritten model (prefill + decode over a split KV cache)", configure=_configure
)
def run_export(args: argparse.Namespace) -> int:
    from headpolicy import HeadPolicy, load_model
    from headpolicy.passes.artifact import export_artifact

    policy = HeadPolicy.load(args.policy)
    model, _ = load_model(args.model)
    t0 = time.perf_counter()
    out = export_artifact(model, policy, args.format, args.output, check_fingerprint=not args.no_fingerprint_check)
    print(
        f"[{args.format}: {out} in {time.perf_counter() - t0:.0f}s; {policy.num_retrieval}/{policy.num_heads} "
        f"KV heads retrieval; batch 1, no padding]",
        file=sys.stderr,
    )
    print(out)
    return 0
