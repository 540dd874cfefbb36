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
    from headpolicy.profiler.scorers.causal import SELECTION

    d = CompileSettings()
    add_model(p)
    p.add_argument("-o", "--output", required=True, help="policy YAML to write (atomically)")
    p.add_argument("--method", default=d.method, choices=scorer_names(),
                   help=f"head scorer (default {d.method}: per-head windows; see README \"Selection\")")  # fmt: skip
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--target-drop", type=float, default=d.target_drop, metavar="PCT",
                     help="default mode: the smallest KV budget whose measured perplexity and answer likelihood "
                          f"stay within PCT%% of the full model's, every answer kept (default {d.target_drop:g})")
    sel.add_argument("--kv-budget", type=float, metavar="F",
                     help="KV cache at the reference context at most F of the full cache (skips the search)")
    sel.add_argument("--budget", type=float, metavar="F",
                     help="fraction F of KV heads that stay retrieval, every other at --sink/--window")
    p.add_argument("--max-kv-budget", type=float, default=d.max_kv_budget, metavar="F",
                   help=f"--target-drop: the largest KV budget tried (default {d.max_kv_budget:g})")
    p.add_argument("--precision", choices=("native", "auto"), default=d.precision,
                   help="native: every head keeps the model's dtype; auto: --kv-budget/--target-drop also choose "
                        "8 or 4 KV bits per head (causal method; exported graphs refuse such policies: use native "
                        "for ONNX) (default: auto where it applies, native with --budget or another "
                        "--method)")  # fmt: skip
    p.add_argument("--sink", type=int, default=d.sink, help=f"streaming heads: first tokens kept (default {d.sink})")
    p.add_argument("--window", type=int, default=d.window,
                   help=f"streaming heads' last tokens kept, for fixed-window methods and --budget ({d.window})")
    p.add_argument("--windows", type=int_list, default=d.windows,
                   help=f"the per-head window ladder (default {','.join(map(str, d.windows))})")
    p.add_argument("--lengths", type=int_list, default=d.lengths, help="calibration task lengths, e.g. 2048,4096")
    p.add_argument("--depths", type=float_list, default=d.depths, help="needle depths of the calibration tasks")
    p.add_argument("--depth-grid", action="store_true",
                   help="a calibration task for every (kind, length, depth), not one per (kind, length) with the "
                        "depths taking turns: len(depths) times the profiling time, for tight budgets")  # fmt: skip
    p.add_argument("--kinds", default=",".join(d.kinds), help="needle kinds: passkey,word,code,multikey")
    p.add_argument("--text-length", type=int, default=d.text_length, help="natural text tokens per calibration text")
    p.add_argument("--text-from", type=int, default=d.text_from, help="text NLL counts from this position on")
    p.add_argument("--min-per-layer", type=int, default=d.min_per_layer, help="--budget: retrieval heads per layer")
    p.add_argument("--reference-context", type=int, default=d.reference_context,
                   help="context length at which KV budgets and fractions are counted")  # fmt: skip
    p.add_argument("--repair-seconds", type=float, default=d.repair_seconds, metavar="S",
                   help=f"byte budgets: at most this long for measured swaps after the knapsack "
                        f"(default {d.repair_seconds:g}; 0 = none)")  # fmt: skip
    p.add_argument("--time-budget", type=float, default=d.time_budget, metavar="S",
                   help=f"no repair swap, and no held-out check (report only), starts that would end the "
                        f"compile past this many seconds (default {d.time_budget:g})")  # fmt: skip
    p.add_argument("--estimate", default=d.estimate, choices=SELECTION,
                   help=f"causal: which estimate orders the per-head options (default {d.estimate})")
    p.add_argument("--passes", type=int, choices=(1, 2), default=d.passes,
                   help="causal: 2 = estimate again at the policy the first pass chooses (the other heads "
                        f"streaming), each option's loss the larger of the two (default {d.passes})")  # fmt: skip
    p.add_argument("--quant-weights", type=float_list, default=d.quant_weights, metavar="W,...",
                   help="--precision auto: weigh the quantisation estimates by each W against the windows', "
                        "measure each knapsack and keep the best (default 1; e.g. 1,0.25,0.0625 for tight "
                        "budgets: one measurement each)")  # fmt: skip
    p.add_argument("--kv-group", type=int, default=d.kv_group, metavar="N",
                   help=f"--precision auto: values per float16 scale and zero point (default {d.kv_group})")
    p.add_argument("--kv-residual", type=int, default=d.kv_residual, metavar="N",
                   help="--precision auto: a quantised retrieval head's newest tokens kept at full precision "
                        f"(at least N, fewer than N + --kv-group; default {d.kv_residual}; 0 = only the group "
                        "not yet full)")  # fmt: skip
    p.add_argument("--no-heldout", action="store_true", help="skip measuring the result on held-out data")
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

    from_args = ("method", "budget", "kv_budget", "target_drop", "max_kv_budget", "sink", "window", "windows",
                 "lengths", "depths", "depth_grid", "text_length", "text_from", "min_per_layer", "reference_context",
                 "seed", "repair_seconds", "time_budget", "estimate", "precision", "passes",
                 "quant_weights", "kv_group", "kv_residual")  # fmt: skip
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    settings = CompileSettings(**{name: getattr(args, name) for name in from_args}, kinds=kinds,
                               heldout=not args.no_heldout)  # fmt: skip
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
    why = f"--budget {budget:g} keeps none" if budget is not None else "the KV budget left room for none"
    spans = {policy.head_window(li, hi) for li, layer in enumerate(policy.layers) for hi in range(len(layer))}
    sinks, windows = {s for s, _ in spans}, {w for _, w in spans}
    sink = f"sink {min(sinks)}" if len(sinks) == 1 else f"sink {min(sinks)}-{max(sinks)}"
    own = f"its own window ({min(windows)}-{max(windows)})"
    kept = f"{sink} + window {min(windows)}" if len(windows) == 1 else f"{sink} + {own}"
    return (
        f"headpolicy compile: warning: no KV head keeps the full cache ({why}): every head keeps only "
        f"{kept} tokens, so the model cannot retrieve anything older than the window; raise --budget or "
        "--kv-budget to keep retrieval heads"
    )


def head_map(policy) -> str:
    """One line per layer: R = retrieval head, else the streaming head's window (k = 1024 tokens)."""

    def mark(li, hi) -> str:
        if policy.layers[li][hi].is_retrieval:
            return "   R"
        window = policy.head_window(li, hi)[1]
        return f"{window // 1024:>3}k" if window % 1024 == 0 else f"{window:>4}"

    rows = (" ".join(mark(li, hi) for hi in range(len(row))) for li, row in enumerate(policy.layers))
    return "\n".join(f"  layer {li:>3}  {marks}" for li, marks in enumerate(rows))


def summary_table(policy, path) -> str:
    r = policy.results
    ctx = r.get("reference_context", 4096)
    rows = [
        ("model", f"{policy.model.name} ({policy.model.shape_str()})"),
        ("method", policy.provenance.method),
        ("retrieval heads", f"{policy.num_retrieval}/{policy.num_heads} ({100 * policy.retrieval_fraction:.1f}%)"),
        ("streaming heads", f"sink {policy.sink}, window {policy.window}" + (" (some heads their own)" if any(
            h.window is not None or h.sink is not None for row in policy.layers for h in row) else "")),
        (f"KV cache at {ctx}", f"{100 * policy.kv_fraction(ctx):.1f}% of full "
                               f"({policy.kv_bytes(ctx) / 2**20:.1f} / {policy.full_kv_bytes(ctx) / 2**20:.1f} MiB)"),
    ]  # fmt: skip
    for name in ("calibration", "heldout"):
        loss = r.get(name, {}).get("loss")
        if loss:
            rows.append((f"{name} loss", _describe(loss)))
        elif "skipped" in r.get(name, {}):
            rows.append((f"{name} check", r[name]["skipped"]))
    for step in r.get("search", []):
        rows.append(("  tried KV budget", f"{100 * step['kv_budget']:.0f}%: {_describe(step)} "
                                          f"{'ok' if step['ok'] else 'too lossy'}"))  # fmt: skip
    if "wall_seconds" in r:
        rows.append(("time", f"{r['wall_seconds']:.0f} s (model load {r['load_seconds']:.0f} s)"))
    rows.append(("written", str(path)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n" + head_map(policy)


def _describe(loss: dict) -> str:
    return (f"perplexity x{loss['ppl_ratio']:.4f}, answer log-prob drop {loss['ans_drop']:.4f} nats/token, "
            f"answers kept {100 * loss['ans_kept']:.0f}%")  # fmt: skip
