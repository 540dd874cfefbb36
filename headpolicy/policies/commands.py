"""CLI: `headpolicy import | inspect | diff | attach` — policies as files."""

from __future__ import annotations

import argparse
import logging

from headpolicy.cli import command

log = logging.getLogger(__name__)


def _configure_import(p: argparse.ArgumentParser) -> None:
    from headpolicy.policies.importers import format_names

    p.add_argument("format", metavar="FORMAT", help=f"one of: {', '.join(format_names())}")
    p.add_argument("src", metavar="SRC", help="the peer's file (DuoAttention: the .tsv or its folder)")
    p.add_argument("--model", required=True, help="the model the pattern is for (alias, checkpoint dir, .gguf)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="policy YAML to write")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--budget", type=float, metavar="F", help="keep the top fraction F of KV heads (by score)")
    sel.add_argument("--threshold", type=float, metavar="T", help="keep KV heads with score >= T")
    p.add_argument("--sink", type=int, help="sink tokens of streaming heads (default: the file's, else 64)")
    p.add_argument("--window", type=int, help="recent window of streaming heads (default: the file's, else 256)")


@command(
    "import",
    help="turn a DuoAttention / Retrieval Head / RazorAttention pattern into a policy",
    configure=_configure_import,
)
def run_import(args: argparse.Namespace) -> int:
    from headpolicy.models import describe_model, load_model
    from headpolicy.policies.importers import import_policy

    model, _ = load_model(args.model, apply_policy=False)
    policy = import_policy(
        args.format,
        args.src,
        describe_model(model),
        budget=args.budget,
        threshold=args.threshold,
        sink=args.sink,
        window=args.window,
    )
    policy.save(args.output)
    print(
        f"wrote {args.output}: {policy.num_retrieval}/{policy.num_heads} retrieval KV heads, "
        f"KV cache at 32K {100 * policy.kv_fraction(32768):.1f}% of full"
    )
    return 0


def _configure_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="policy YAML")
    p.add_argument("--png", metavar="OUT", help="also draw a layers x KV heads heat map to OUT")


@command(
    "inspect", help="show a policy: per-layer retrieval heads, scores, KV cache saved", configure=_configure_inspect
)
def run_inspect(args: argparse.Namespace) -> int:
    from headpolicy.policies.inspect import format_inspect, save_heatmap
    from headpolicy.policies.schema import HeadPolicy

    policy = HeadPolicy.load(args.file)
    print(format_inspect(policy))
    if args.png:
        print(f"heat map: {save_heatmap(policy, args.png)}")
    return 0


def _configure_diff(p: argparse.ArgumentParser) -> None:
    p.add_argument("a", metavar="A", help="policy YAML")
    p.add_argument("b", metavar="B", help="policy YAML")


@command(
    "diff", help="compare two policies: heads that changed kind, score rank correlation", configure=_configure_diff
)
def run_diff(args: argparse.Namespace) -> int:
    from headpolicy.policies.inspect import diff_policies, format_diff
    from headpolicy.policies.schema import HeadPolicy

    a, b = HeadPolicy.load(args.a), HeadPolicy.load(args.b)
    print(format_diff(diff_policies(a, b), a, b, names=(args.a, args.b)))
    return 0


def _configure_attach(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="Hugging Face checkpoint directory")
    p.add_argument("policy", metavar="POLICY", help="policy YAML made for that checkpoint")


@command(
    "attach", help="put a policy into a checkpoint directory so load_model applies it", configure=_configure_attach
)
def run_attach(args: argparse.Namespace) -> int:
    from headpolicy.checkpoint import attach

    path = attach(args.checkpoint, args.policy)
    print(f"wrote {path}")
    return 0
