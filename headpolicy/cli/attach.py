"""`headpolicy attach CHECKPOINT_DIR POLICY`: ship a policy inside a checkpoint so load_model applies it."""

from __future__ import annotations

import argparse

from headpolicy.cli import command


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="Hugging Face checkpoint directory")
    p.add_argument("policy", metavar="POLICY", help="policy YAML made for that checkpoint")


@command("attach", help="put a policy into a checkpoint directory so load_model applies it", configure=_configure)
def run_attach(args: argparse.Namespace) -> int:
    from headpolicy.runtime.checkpoint import attach

    path = attach(args.checkpoint, args.policy)
    print(f"wrote {path}")
    return 0
