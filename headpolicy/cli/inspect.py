"""`headpolicy inspect FILE [--png OUT]`: a policy's per-layer table, the KV cache it saves, a heat map."""

from __future__ import annotations

import argparse

from headpolicy.cli import command


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="policy YAML")
    p.add_argument("--png", metavar="OUT", help="also draw a layers x KV heads heat map to OUT")


@command("inspect", help="show a policy: per-layer retrieval heads, scores, KV cache saved", configure=_configure)
def run_inspect(args: argparse.Namespace) -> int:
    from headpolicy.policies.inspect import format_inspect, save_heatmap
    from headpolicy.policies.schema import HeadPolicy

    policy = HeadPolicy.load(args.file)
    print(format_inspect(policy))
    if args.png:
        print(f"heat map: {save_heatmap(policy, args.png)}")
    return 0
