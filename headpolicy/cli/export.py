"""`headpolicy export MODEL --policy FILE --format {pt2,onnx} -o OUT`: the policy-rewritten model as a graph."""

from __future__ import annotations

import argparse
import sys
import time

from headpolicy.cli import command
from headpolicy.cli.args import add_model, add_no_fingerprint_check


def _configure(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--policy", required=True, help="policy YAML to compile into the graph")
    p.add_argument("--format", choices=("pt2", "onnx"), default="onnx", help="pt2: one archive; onnx: a folder")
    p.add_argument("-o", "--output", required=True, help="output .pt2 file or ONNX folder")
    add_no_fingerprint_check(p, "export")


@command(
    "export", help="export the policy-rewritten model (prefill + decode over a split KV cache)", configure=_configure
)
def run_export(args: argparse.Namespace) -> int:
    from headpolicy.models import load_source
    from headpolicy.passes.artifact import export_artifact
    from headpolicy.policies.schema import HeadPolicy

    policy = HeadPolicy.load(args.policy)
    model, _ = load_source(args.model)
    t0 = time.perf_counter()
    out = export_artifact(model, policy, args.format, args.output, check_fingerprint=not args.no_fingerprint_check)
    print(
        f"[{args.format}: {out} in {time.perf_counter() - t0:.0f}s; {policy.num_retrieval}/{policy.num_heads} "
        f"KV heads retrieval; batch 1, no padding]",
        file=sys.stderr,
    )
    print(out)
    return 0
