"""Head scorers compared: profiling time, passkey accuracy at each budget, KV fraction.

For one model (SmolLM2-135M by default), every scorer profiles the model once on the
scoring tasks `headpolicy compile` uses (passkey on a sampled haystack + multikey, 1K
tokens, 3 depths; repeated random tokens), and that one score map is selected at every
budget (`select_budget`). Each (scorer, budget) policy is then run through the real
runtime (`headpolicy.apply`, split KV cache, greedy `generate`) on eval tasks (passkey and
multikey at 2K and 4K tokens and 3 depths, on a haystack sampled with another seed, long
enough not to repeat), next to the full model and the all-streaming baseline. Policies run
only the tasks the full model answers (the others count as misses, as in compile's closed
loop), which saves a third of the time and cannot flatter a policy. `hybrid` (mean of
max-normalised retrieval and attention_mass) and `ensemble` reuse their members' score maps;
their time is the sum of theirs.
Head sets are nested (the top k of one score map), so with `--infer` (default) budgets are
bisected: above a budget that already matches the full model, and below one that matches
all-streaming, cells are recorded as `inferred_from` that budget instead of run (marked * in
the table); this assumes accuracy does not drop when heads are added.
`--resume` keeps the baselines and scorers already in the results file and runs the rest.

Default choice ("best per minute of profiling"): a scorer's *gain* is its mean accuracy over
budgets and lengths minus the all-streaming baseline's. A minute of profiling is a minute of
`headpolicy compile`: the scorer's own time plus what every compile spends besides scoring
(loading the model, sampling the haystack, the full model's held-out run; `shared_seconds`,
measured here or read from a compile report with `--report --shared-from FILE`). Among
scorers whose gain is at least half the best gain (a fast scorer that does not help is not a
bargain), the one with the largest gain per minute wins.

    python bench/scorers.py                      # ~40 min on 2 idle CPU cores
    python bench/scorers.py --depths 0.5 --gates-max-steps 20 --tag quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from headpolicy import describe_model, load_model
from headpolicy.eval.baselines import streaming_policy
from headpolicy.io import write_json
from headpolicy.policies.schema import HeadPolicy
from headpolicy.policies.select import select_budget
from headpolicy.profiler import tasks as T
from headpolicy.profiler.compile import CompileSettings, haystack_pool, scoring_tasks
from headpolicy.profiler.scorers import get_scorer
from headpolicy.profiler.scorers.ensemble import HYBRID, MEMBERS, agreement, format_agreement
from headpolicy.profiler.scorers.gates import GateSettings, train_gates
from headpolicy.runtime.generate import answers, applied_copy

RESULTS = Path(__file__).parent / "results"
SCORERS = ("retrieval", "attention_mass", "echo_induction", "hybrid", "ensemble", "gates")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scorers", nargs="+", default=list(SCORERS))
    p.add_argument("--budgets", nargs="+", type=float, default=[0.1, 0.2, 0.33, 0.5])
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096], help="eval passkey lengths")
    p.add_argument("--depths", nargs="+", type=float, default=[0.25, 0.5, 0.75], help="eval needle depths")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--gates-max-steps", type=int, default=GateSettings.max_steps)
    p.add_argument("--tag", default="smollm2-135m", help="results file: bench/results/scorers_<tag>.json")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    p.add_argument("--infer", action=argparse.BooleanOptionalAction, default=True,
                   help="skip budgets settled by nesting (see the module docstring)")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="reuse baselines and scorers already in the results file")
    p.add_argument("--report", action="store_true", help="no model: recompute the summary of the results file")
    p.add_argument("--merge", nargs="*", default=[], help="with --report: add scorers from these results files")
    p.add_argument("--shared-from", help="with --report: take shared_seconds from this `compile --json` report")
    return p.parse_args()


def choose_default(rows: dict, streaming_acc: float, shared_seconds: float = 0.0) -> dict:
    """The module docstring's rule, on {scorer: {"accuracy": mean %, "seconds": profiling s}}."""
    gains = {n: r["accuracy"] - streaming_acc for n, r in rows.items()}
    best = max(gains.values())
    eligible = [n for n, g in gains.items() if g >= 0.5 * best and g > 0]
    per_min = {n: gains[n] / max((rows[n]["seconds"] + shared_seconds) / 60.0, 1e-9) for n in eligible}
    choice = max(per_min, key=per_min.get) if per_min else max(gains, key=gains.get)
    return {
        "rule": "largest (mean accuracy - streaming) per compile minute (scorer + shared seconds) among scorers "
        "with >= half the best gain",
        "shared_seconds": round(shared_seconds, 1),
        "gain_points": {n: round(g, 2) for n, g in gains.items()},
        "gain_per_minute": {n: round(v, 2) for n, v in per_min.items()},
        "choice": choice,
    }


def format_table(result: dict) -> str:
    lengths = [str(n) for n in result["settings"]["eval_lengths"]]
    head = f"{'scorer':<15} {'profile s':>9} {'budget':>6} {'heads':>5} " + " ".join(
        f"{'acc@' + n:>8}" for n in lengths
    )
    head += " " + " ".join(f"{'KV@' + n:>8}" for n in lengths)
    lines = [head, "-" * len(head)]
    for name in ("full", "streaming"):
        b = result["baselines"][name]
        accs = " ".join(f"{b['accuracy'][n]:>8.0f}" for n in lengths)
        kv = " ".join(f"{100 * b['kv_fraction'][n]:>7.1f}%" for n in lengths)
        lines.append(f"{name:<15} {'':>9} {'':>6} {b['retrieval_heads']:>5} {accs} {kv}")
    for name, row in result["scorers"].items():
        for cell in row["budgets"]:
            accs = " ".join(f"{cell['accuracy'][n]:>8.0f}" for n in lengths)
            kv = " ".join(f"{100 * cell['kv_fraction'][n]:>7.1f}%" for n in lengths)
            k = cell["retrieval_heads"]
            lines.append(f"{name:<15} {row['profile_seconds']:>9.0f} {cell['budget']:>6.2f} {k:>5} {accs} {kv}")
    return "\n".join(lines)


def main() -> int:
    args = parse()
    if args.report:
        return report(args)
    torch.manual_seed(0)
    out_path = RESULTS / f"scorers_{args.tag}.json"
    RESULTS.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    model, tok = load_model(args.model)
    codec = T.as_codec(tok)
    info = describe_model(model, args.model)
    cs = CompileSettings(sink=args.sink, window=args.window)
    tasks = scoring_tasks(codec, cs, haystack_pool(model, codec, cs))
    shared = time.perf_counter() - t_start  # + the full model's held-out run, below
    # held out by seed: other pass keys, another sampled haystack, longer tasks
    eval_pool = T.sample_haystack(model, codec, max(args.lengths), seed=1)
    held = T.task_grid(codec, kinds=T.NEEDLE_KINDS, lengths=args.lengths, depths=args.depths, seed=1, pool=eval_pool)
    gate_settings = GateSettings(max_steps=args.gates_max_steps)

    result: dict = {
        "model": info.name,
        "shape": {"layers": info.num_layers, "kv_heads": info.num_kv_heads, "heads": info.num_attention_heads},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
        },  # fmt: skip
        "settings": {
            "budgets": args.budgets,
            "eval_lengths": args.lengths,
            "eval_depths": args.depths,
            "eval_kind": "passkey + multikey (sampled haystack, seed 1), greedy generate through headpolicy.apply",
            "eval_tasks_per_length": len(args.depths) * len(T.NEEDLE_KINDS),
            "eval_scope": "policies run the tasks the full model answers; the others count as misses",
            "scoring_tasks": {k: sum(t.kind == k for t in tasks) for k in T.KINDS},
            "scoring_lengths": list(cs.lengths),
            "sink": args.sink,
            "window": args.window,
            "gates": asdict(gate_settings),
            "ensemble_members": list(MEMBERS),
            "hybrid_members": list(HYBRID),
            "note": args.note,
            "infer": args.infer,
        },
        "baselines": {},
        "scorers": {},
    }

    def save() -> None:
        write_json(out_path, result)

    def per_length(good: set[str]) -> dict:
        """Percent of each length's eval tasks whose name is in `good`."""
        return {str(n): 100.0 * sum(t.name() in good for t in held if t.length == n) / sum(t.length == n for t in held)
                for n in args.lengths}  # fmt: skip

    answered: list = held  # until the full model has run

    def evaluate(policy) -> dict:
        outs = answers(applied_copy(model, policy), codec.decode, answered)
        return per_length({o.task.name() for o in outs if o.correct})

    def kv(policy) -> dict:
        return {str(n): round(policy.kv_fraction(n), 4) for n in args.lengths}

    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    if args.resume and out_path.exists():
        old = json.loads(out_path.read_text())
        if old["settings"]["eval_lengths"] != args.lengths or old["settings"]["eval_depths"] != args.depths:
            raise SystemExit(f"--resume: {out_path} was run with other eval lengths/depths")
        result["baselines"] = old["baselines"]
        if "shared_seconds" in old:
            result["shared_seconds"] = old["shared_seconds"]
        result["settings"]["note"] = "; ".join(x for x in (old["settings"].get("note"), args.note) if x)
        for name, row in old["scorers"].items():
            result["scorers"][name] = row
            scores[name], seconds[name] = np.asarray(row["scores"], dtype=np.float32), row["profile_seconds"]
        print(f"resumed: baselines + {list(old['scorers'])}", flush=True)

    t = time.perf_counter()
    if "full" in result["baselines"]:
        full_acc, names = result["baselines"]["full"]["accuracy"], set(result["baselines"]["full"]["answered"])
    else:
        names = {o.task.name() for o in answers(model, codec.decode, held) if o.correct}
        full_acc = per_length(names)
    answered = [t for t in held if t.name() in names]
    result.setdefault("shared_seconds", round(shared + time.perf_counter() - t, 1))
    stream = streaming_policy(info, sink=args.sink, window=args.window)
    result["baselines"]["full"] = {
        "accuracy": full_acc,
        "kv_fraction": {str(n): 1.0 for n in args.lengths},
        "retrieval_heads": info.num_layers * info.num_kv_heads,
        "answered": sorted(names),
    }
    if "streaming" not in result["baselines"]:
        acc = evaluate(stream)
        result["baselines"]["streaming"] = {"accuracy": acc, "kv_fraction": kv(stream), "retrieval_heads": 0}
    print(f"baselines: {result['baselines']} ({time.perf_counter() - t:.0f} s)", flush=True)
    save()

    cache: dict[bytes, dict] = {}  # identical head tables are evaluated once
    for name in args.scorers:
        if name in result["scorers"]:
            continue
        t = time.perf_counter()
        extra = {}
        combined = get_scorer(name)
        if combined.members:
            members = combined.members
            missing = [m for m in members if m not in scores]
            if missing:
                raise SystemExit(f"{name} needs its members scored first: {missing}")
            scores[name] = combined.combine({m: scores[m] for m in members})
            seconds[name] = sum(seconds[m] for m in members)
        elif name == "gates":
            run = train_gates(model, tasks, sink=args.sink, window=args.window, settings=gate_settings)
            scores[name], seconds[name] = run.scores, time.perf_counter() - t
            extra = {"steps": run.steps, "stopped_early": run.stopped_early, "train_sink": run.sink,
                     "train_window": run.window, "open_gates": int((run.gates > 0.5).sum()),
                     "final_loss": run.losses[-1], "rhos": [round(r, 4) for r in run.rhos]}  # fmt: skip
        else:
            scores[name] = get_scorer(name)(model, tasks, sink=args.sink, window=args.window)
            seconds[name] = time.perf_counter() - t
        print(f"{name}: profiled in {seconds[name]:.0f} s {extra}", flush=True)
        cells = {}
        todo = sorted(args.budgets)
        while todo:
            b = todo[len(todo) // 2]  # bisect: one cell can settle the budgets on one side
            table = select_budget(scores[name], b)
            policy = HeadPolicy.from_kinds(info, table.tolist(), sink=args.sink, window=args.window)
            key = np.packbits(table).tobytes()
            te = time.perf_counter()
            if key not in cache:
                cache[key] = evaluate(policy)
            acc = cache[key]
            cells[b] = {"budget": b, "retrieval_heads": int(table.sum()), "accuracy": acc, "kv_fraction": kv(policy),
                        "eval_seconds": round(time.perf_counter() - te, 1)}  # fmt: skip
            print(f"  budget {b:.2f}: {cells[b]}", flush=True)
            todo.remove(b)
            if args.infer and acc == full_acc:  # larger budgets keep a superset of these heads
                side = [x for x in todo if x > b]
            elif args.infer and acc == result["baselines"]["streaming"]["accuracy"]:  # smaller: a subset
                side = [x for x in todo if x < b]
            else:
                side = []
            for x in side:
                t2 = select_budget(scores[name], x)
                p2 = HeadPolicy.from_kinds(info, t2.tolist(), sink=args.sink, window=args.window)
                cells[x] = {"budget": x, "retrieval_heads": int(t2.sum()), "accuracy": acc, "kv_fraction": kv(p2),
                            "inferred_from": b}  # fmt: skip
                todo.remove(x)
        cells = [cells[b] for b in args.budgets]
        result["scorers"][name] = {
            "profile_seconds": round(seconds[name], 1),
            "scores": np.round(scores[name], 6).tolist(),
            "budgets": cells,
            **extra,
        }
        save()

    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    finish(result, out_path)
    return 0


def finalize(result: dict) -> dict:
    """Mean accuracy per scorer, the default choice and scorer agreement, from the stored results."""
    streaming_mean = float(np.mean(list(result["baselines"]["streaming"]["accuracy"].values())))
    rows = {
        n: {
            "accuracy": float(np.mean([v for c in r["budgets"] for v in c["accuracy"].values()])),
            "seconds": r["profile_seconds"],
        }
        for n, r in result["scorers"].items()
    }
    for n, r in rows.items():
        result["scorers"][n]["mean_accuracy"] = round(r["accuracy"], 2)
    result["default"] = choose_default(rows, streaming_mean, result.get("shared_seconds", 0.0))
    scores = {n: np.asarray(r["scores"]) for n, r in result["scorers"].items()}
    if len(scores) > 1:
        result["agreement"] = agreement(scores, result["settings"]["budgets"])
    return result


def markdown_table(result: dict) -> str:
    """The README table: one row per scorer, accuracy at each budget and length, KV at the longest length."""
    lengths = [str(n) for n in result["settings"]["eval_lengths"]]
    budgets = result["settings"]["budgets"]
    head = ["scorer", "profile s"] + [f"{100 * b:.0f}%: acc {'/'.join(x[:-3] + 'K' for x in lengths)}" for b in budgets]
    head += ["mean acc %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ("full", "streaming"):
        b = result["baselines"][name]
        acc = "/".join(f"{b['accuracy'][n]:.0f}" for n in lengths)
        lines.append(f"| {name} (baseline) | - | " + " | ".join([acc] * len(budgets)) + " | - |")
    for name, row in result["scorers"].items():
        cells = [
            "/".join(f"{c['accuracy'][n]:.0f}" for n in lengths) + ("*" if "inferred_from" in c else "")
            for c in row["budgets"]
        ]
        lines.append(
            f"| {name} | {row['profile_seconds']:.0f} | " + " | ".join(cells) + f" | {row['mean_accuracy']:.1f} |"
        )
    any_row = next(iter(result["scorers"].values()))
    kv = ", ".join(
        f"{100 * c['budget']:.0f}% -> {100 * c['kv_fraction'][lengths[-1]]:.1f}%" for c in any_row["budgets"]
    )
    lines.append("")
    stream = result["baselines"]["streaming"]["kv_fraction"][lengths[-1]]
    lines.append(f"KV cache at {lengths[-1]} tokens (same for every scorer at a budget): {kv}; "
                 f"all streaming {100 * stream:.1f}%.")  # fmt: skip
    return "\n".join(lines)


def finish(result: dict, out_path: Path) -> None:
    write_json(out_path, finalize(result))
    print(format_table(result))
    if "agreement" in result:
        print(format_agreement(result["agreement"]))
    print(markdown_table(result))
    d = result["default"]
    print(f"default: {d['choice']}  (gain per compile minute: {d['gain_per_minute']})")
    print(f"wrote {out_path}")


def report(args: argparse.Namespace) -> int:
    """No model: re-read the results file, merge scorers from --merge files, recompute the summary."""
    out_path = RESULTS / f"scorers_{args.tag}.json"
    result = json.loads(out_path.read_text())
    for other in args.merge:
        extra = json.loads(Path(other).read_text())
        if extra["settings"]["eval_lengths"] != result["settings"]["eval_lengths"]:
            raise SystemExit(f"{other} was evaluated at other lengths")
        result["scorers"].update({n: r for n, r in extra["scorers"].items() if n not in result["scorers"]})
    if args.shared_from:
        rep = json.loads(Path(args.shared_from).read_text())
        sec = rep["seconds"]
        result["shared_seconds"] = round(rep["results"]["load_seconds"] + sec["tasks"] + sec["heldout_full"], 1)
        result["settings"]["shared_from"] = args.shared_from
    finish(result, out_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
