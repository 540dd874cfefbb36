"""`headpolicy import FORMAT SRC --model M -o FILE`: a peer's head pattern (DuoAttention, ...) as a policy."""

from __future__ import annotations

import argparse

from headpolicy.cli import command


def _configure(p: argparse.ArgumentParser) -> None:
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


@command("import", help="turn a DuoAttention / Retrieval Head / RazorAttention pattern into a policy",
         configure=_configure)  # fmt: skip
def run_import(args: argparse.Namespace) -> int:
    from headpolicy.models import describe_model, load_source
    from headpolicy.policies.importers import check_options, policy_from_source, read_source

    options = {"budget": args.budget, "threshold": args.threshold, "sink": args.sink, "window": args.window}
    # The format, the file's syntax and the options need no model: refuse them before the model loads.
    source = read_source(args.format, args.src)
    check_options(source, **options)
    model, _ = load_source(args.model)
    policy = policy_from_source(source, describe_model(model), **options)
    policy.save(args.output)
    print(
        f"wrote {args.output}: {policy.num_retrieval}/{policy.num_heads} retrieval KV heads, "
        f"KV cache at 32K {100 * policy.kv_fraction(32768):.1f}% of full"
    )
    return 0
