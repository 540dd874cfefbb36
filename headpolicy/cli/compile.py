"""`headpolicy compile MODEL -o FILE`: profile a model and write its head policy."""

from __future__ import annotations

import argparse
import sys
import time

from headpolicy.cli import command
from headpolicy.cli.args import add_model, float_list, int_list


def _configure(p: argparse.ArgumentParser) -> None:
    from headpolicy.profiler.compile import CompileSettings
    from headpolicy.profiler.scorers import scorer_names

    d = CompileSettings()
    add_model(p)
    p.add_argument("-o", "--output", required=True, help="policy YAML to write (atomically)")
    p.add_argument("--method", default=d.method, choices=scorer_names(),
                   help=f"head scorer (default {d.method}, from bench/scorers.py; see README \"Scorers\")")  # fmt: skip
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--budget", type=float, help="fraction of KV heads that stay retrieval (skips the search)")
    sel.add_argument("--target-drop", type=float, default=d.target_drop,
                     help=f"closed loop: allowed held-out accuracy drop (default {d.target_drop:g})")  # fmt: skip
    p.add_argument("--sink", type=int, default=d.sink, help=f"streaming heads: first tokens kept (default {d.sink})")
    p.add_argument("--window", type=int, default=d.window, help=f"streaming heads: last tokens kept ({d.window})")
    p.add_argument("--lengths", type=int_list, default=d.lengths, help="scoring task lengths, e.g. 1024,2048")
    p.add_argument("--depths", type=float_list, default=d.depths, help="needle depths of the scoring tasks")
    p.add_argument("--heldout-lengths", type=int_list, default=d.heldout_lengths, help="held-out task lengths")
    p.add_argument("--heldout-depths", type=float_list, default=d.heldout_depths, help="held-out needle depths")
    p.add_argument("--min-per-layer", type=int, default=d.min_per_layer, help="retrieval heads every layer keeps")
    p.add_argument("--max-budget", type=float, default=d.max_budget, help="closed loop: largest budget tried")
    p.add_argument("--reference-context", type=int, default=d.reference_context,
                   help="context length at which the KV fraction is reported")  # fmt: skip
    p.add_argument("--no-verify", action="store_true", help="with --budget: skip the held-out accuracy check")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--scores-json", help="also write the raw head scores here")
    p.add_argument("--json", help="also write a JSON report (settings, results, timings) here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


@command("compile", help="profile a model on synthetic retrieval tasks and write its head policy", configure=_configure)
def run_compile(args: argparse.Namespace) -> int:
    import torch

    from headpolicy.io import write_json
    from headpolicy.models import load_source
    from headpolicy.profiler.compile import CompileSettings, compile_policy

    from_args = ("method", "budget", "target_drop", "sink", "window", "lengths", "depths", "heldout_lengths",
                 "heldout_depths", "min_per_layer", "max_budget", "reference_context", "seed")  # fmt: skip
    settings = CompileSettings(**{name: getattr(args, name) for name in from_args}, verify=not args.no_verify)
    settings.check()  # fail on bad settings before spending time on loading the model
    t0 = time.perf_counter()
    model, tok = load_source(args.model)
    load_s = time.perf_counter() - t0
    report = compile_policy(model, tok, settings, progress=not args.quiet)
    policy = report.policy
    policy = policy.replace(results={**policy.results, "load_seconds": round(load_s, 1),
                                     "wall_seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
    out = policy.save(args.output)
    if args.scores_json:
        write_json(args.scores_json, {k: v.tolist() for k, v in report.scores.items()})
    if args.json:
        report_data = {
            "model": policy.model.name,
            "policy": str(out),
            "retrieval_heads": policy.num_retrieval,
            "num_heads": policy.num_heads,
            "sink": policy.sink,
            "window": policy.window,
            "settings": policy.provenance.settings,
            "results": policy.results,
            "seconds": {k: round(v, 1) for k, v in report.seconds.items()},
            "torch_threads": torch.get_num_threads(),
        }
        write_json(args.json, report_data)
    print(summary_table(policy, out), file=sys.stdout)
    if policy.num_retrieval == 0:
        print(all_streaming_warning(policy, args.budget), file=sys.stderr)
    members = {k: v for k, v in report.scores.items() if k != args.method}
    if len(members) > 1:  # a combined method: how much do its members agree?
        from headpolicy.profiler.scorers.ensemble import agreement, format_agreement

        print(format_agreement(agreement(members)), file=sys.stdout)
    return 0


def all_streaming_warning(policy, budget: float | None) -> str:
    """A policy without retrieval heads is StreamingLLM: valid, but rarely what a user meant."""
    why = f"--budget {budget:g} keeps none" if budget is not None else "the closed loop chose none"
    return (
        f"headpolicy compile: warning: no KV head keeps the full cache ({why}): every head keeps only "
        f"sink {policy.sink} + window {policy.window} tokens, so the model cannot retrieve anything older "
        "than the window; raise --budget to keep retrieval heads"
    )


def head_map(policy) -> str:
    """One line per layer: R = retrieval head, . = streaming head."""
    rows = ("".join("R" if h.is_retrieval else "." for h in row) for row in policy.layers)
    return "\n".join(f"  layer {li:>3}  {marks}" for li, marks in enumerate(rows))


def summary_table(policy, path) -> str:
    r = policy.results
    ctx = r.get("reference_context", 4096)
    rows = [
        ("model", f"{policy.model.name} ({policy.model.shape_str()})"),
        ("method", policy.provenance.method),
        ("retrieval heads", f"{policy.num_retrieval}/{policy.num_heads} ({100 * policy.retrieval_fraction:.1f}%)"),
        ("sink / window", f"{policy.sink} / {policy.window}"),
        (f"KV cache at {ctx}", f"{100 * policy.kv_fraction(ctx):.1f}% of full "
                               f"({policy.kv_bytes(ctx) / 2**20:.1f} / {policy.full_kv_bytes(ctx) / 2**20:.1f} MiB)"),
    ]  # fmt: skip
    held = r.get("heldout")
    if held:
        rows.append(("held-out accuracy", f"full {held['full_accuracy']:.1f}%  policy {held['policy_accuracy']:.1f}%  "
                                          f"({held['tasks']} tasks, lengths {held['lengths']})"))  # fmt: skip
    for step in r.get("search", []):
        rows.append(("  tried budget", f"{step['budget']:.2f} ({step['retrieval_heads']} heads): "
                                       f"{step['accuracy']:.1f}% {'ok' if step['ok'] else 'too low'}"))  # fmt: skip
    if "wall_seconds" in r:
        rows.append(("time", f"{r['wall_seconds']:.0f} s (model load {r['load_seconds']:.0f} s)"))
    rows.append(("written", str(path)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n" + head_map(policy)
