"""`headpolicy attach CHECKPOINT_DIR POLICY`: ship a policy inside a checkpoint so load_model applies it."""

from __future__ import annotations

import argparse

from headpolicy.cli import command
from headpolicy.cli.args import add_no_fingerprint_check


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="Hugging Face checkpoint directory")
    p.add_argument("policy", metavar="POLICY", help="policy YAML made for that checkpoint")
    add_no_fingerprint_check(p, "attach")


@command("attach", help="put a policy into a checkpoint directory so load_model applies it", configure=_configure)
def run_attach(args: argparse.Namespace) -> int:
    from headpolicy.runtime.checkpoint import attach

    path = attach(args.checkpoint, args.policy, check_fingerprint=not args.no_fingerprint_check)
    print(f"wrote {path}")
    return 0
