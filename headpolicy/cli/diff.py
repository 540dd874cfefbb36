"""`headpolicy diff A B`: heads that changed kind or window between two policies, score rank correlation."""

from __future__ import annotations

import argparse

from headpolicy.cli import command


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="policy YAML")
    p.add_argument("b", metavar="B", help="policy YAML")


@command("diff", help="compare two policies: heads that changed kind, score rank correlation", configure=_configure)
def run_diff(args: argparse.Namespace) -> int:
    from headpolicy.policies.inspect import diff_policies, format_diff
    from headpolicy.policies.schema import HeadPolicy

    a, b = HeadPolicy.load(args.a), HeadPolicy.load(args.b)
    print(format_diff(diff_policies(a, b), a, b, names=(args.a, args.b)))
    return 0
