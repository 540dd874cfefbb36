"""Selection methods compared at equal KV budgets: paired answers lost, objective, perplexity; Pareto curves.

For one model (SmolLM2-135M by default), every method profiles once on compile's calibration
set (needle tasks at 2K and 4K in Austen's prose, plus long text; profiler/compile.py), and
its estimates are allocated at each KV budget (a fraction of the full cache at 4K tokens) with
compile's own `at_kv_budget`. Each policy is then:

- measured on the calibration set (the objective compile optimises: answer log-prob drop +
  text NLL increase, nats per token);
- run through the real runtime (apply + split cache + greedy generation) on held-out items
  (`headpolicy eval`'s data: wording "B", Moby-Dick), paired against the full model on the
  same items: answers lost and gained;
- measured on held-out long text: perplexity ratio against the full model.

Methods:
    causal+windows   causal estimates for every window of compile's ladder, exact knapsack (compile's default)
    causal           the same estimates at the one sink/window (64 + 256)
    attention_mass, retrieval, echo_induction, ensemble, gates
                     ranking scorers at sink 64 + window 256 (the heads they rank highest keep everything)
    METHOD+comp      the same, every streaming head with RazorAttention's compensation token (its
                     slot counted in the budget: equal bytes)
    METHOD+auto      causal methods with compile's --precision auto: each head's KV bits (16/8/4)
                     chosen with its window, budgets in bytes of the model's dtype
    METHOD+rescore   causal methods with compile's --passes 2: estimated again at each budget's
                     first choice (the other heads streaming), each option's loss the larger

    python bench/selection.py                         # every method x 15/25/35/50%, ~2 h on 2 idle cores
    python bench/selection.py --methods causal+windows,attention_mass --budgets 0.25,0.35 --tag quick
    python bench/selection.py --report                # table + Pareto PNG from the stored JSON

Writes bench/results/selection_<tag>.json (after every cell: --resume continues) and
selection_<tag>.png. Profiling time per method is measured in this process; compare it with
an idle machine's `headpolicy compile` timings (bench/results/compile_*.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

# bench/kernels.py would shadow the Hugging Face `kernels` package that transformers imports:
# run as a script, this folder is sys.path[0], so it comes off the path first.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from headpolicy.eval.suite import SuiteSettings, paired, suite_tasks, suite_texts  # noqa: E402
from headpolicy.io import atomic_write, write_json  # noqa: E402
from headpolicy.models import describe_model, load_source  # noqa: E402
from headpolicy.profiler import compile as C  # noqa: E402
from headpolicy.profiler import objective as O  # noqa: E402
from headpolicy.profiler import tasks as T  # noqa: E402
from headpolicy.runtime.generate import answers, applied_copy, context_limit  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = ("causal+windows", "causal", "attention_mass", "retrieval", "echo_induction", "ensemble", "gates")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", default=",".join(METHODS[:-1]), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--budgets", default="0.15,0.25,0.35,0.5", help="KV budgets (fraction of the full cache at 4K)")
    p.add_argument("--lengths", default="4096", help="held-out item lengths")
    p.add_argument("--seeds", type=int, default=2, help="held-out items per kind and depth")
    p.add_argument("--depths", default="0.15,0.5,0.85", help="held-out needle depths")
    p.add_argument("--texts", type=int, default=2, help="held-out 4K texts for perplexity")
    p.add_argument("--tag", default="smollm2-135m")
    p.add_argument("--resume", action="store_true", help="keep the cells already in the results file")
    p.add_argument("--report", action="store_true", help="only print the table and draw the PNG from the JSON")
    return p.parse_args()


def numbers(text: str, kind=float) -> tuple:
    return tuple(kind(x) for x in text.replace(",", " ").split())


VARIANTS = ("+rescore", "+comp", "+auto")  # suffixes a method name may end with, in this order


def split_method(method: str) -> tuple[str, set[str]]:
    """(base method, its variant suffixes): "causal+windows+auto" -> ("causal+windows", {"+auto"})."""
    variants = set()
    for suffix in reversed(VARIANTS):
        if method.endswith(suffix):
            method, variants = method.removesuffix(suffix), variants | {suffix}
    return method, variants


def settings(method: str) -> C.CompileSettings:
    """compile's settings for a method name. `+comp`: the same with compensation tokens (their slot
    counted in the budget, so compensated rows compare at equal bytes); `+auto`: compile's
    --precision auto (8 or 4 KV bits per head chosen with the windows, bytes counted exactly)."""
    base, variants = split_method(method)
    extra = {"compensate": "+comp" in variants, "precision": "auto" if "+auto" in variants else "native",
             "passes": 2 if "+rescore" in variants else 1}  # fmt: skip
    if base == "causal+windows":
        return C.CompileSettings(method="causal", **extra)
    if base == "causal":
        return C.CompileSettings(method="causal", windows=(256,), **extra)
    return C.CompileSettings(method=base, **extra)


def profile(method: str, model, data: C.CalibrationData, ref: O.Reference, cache: dict):
    """The method's first-pass scores (computed once per base method and precision: compensation and
    a second pass do not change them)."""
    s = settings(method)
    key = split_method(method)[0] + ("+auto" if s.auto_precision else "")
    if key not in cache:
        t = time.perf_counter()
        cache[key] = C.score(model, data, ref, s), time.perf_counter() - t
    scored, seconds = cache[key]
    return scored, s, seconds


def main() -> int:
    args = parse()
    out_path = RESULTS / f"selection_{args.tag}.json"
    if args.report:
        result = __import__("json").loads(out_path.read_text())
        print(format_table(result))
        print(f"Pareto curves: {draw(result, out_path.with_suffix('.png'))}")
        return 0
    torch.manual_seed(0)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if split_method(m)[0] not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")
    budgets = numbers(args.budgets)

    t0 = time.perf_counter()
    model, tok = load_source(args.model)
    codec = T.as_codec(tok)
    info = describe_model(model, args.model)
    esize = next(model.parameters()).element_size()  # what KV fractions are of (the full cache in the model's dtype)
    data = C.make_calibration(codec, C.CompileSettings(heldout=False))
    ref = O.reference(model, data.calib)
    shared = time.perf_counter() - t0
    suite = SuiteSettings(lengths=numbers(args.lengths, int), depths=numbers(args.depths), seeds=args.seeds,
                          text_lengths=(4096,), texts=args.texts)  # fmt: skip
    items = suite_tasks(codec, suite)
    texts = suite_texts(codec, suite, context_limit(model))

    result = __import__("json").loads(out_path.read_text()) if args.resume and out_path.exists() else {}
    if not result:
        print("full model on the held-out items ...", file=sys.stderr, flush=True)
        full = answers(model, codec.decode, items)
        with torch.no_grad():
            full_nll = [float(O.text_nll(model, t, suite.text_from).double().mean()) for t in texts]
        result = {
            "model": info.name,
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                        "platform": platform.platform(), "python": sys.version.split()[0]},  # fmt: skip
            "settings": {"budgets": list(budgets), "items": len(items), "item_lengths": list(suite.lengths),
                         "kinds": list(suite.kinds), "text_tokens": 4096 * len(texts), "text_from": suite.text_from,
                         "calibration_tasks": len(data.calib.tasks), "calibration_answered": sum(ref.answered),
                         "shared_seconds": round(shared, 1)},  # fmt: skip
            "full": {"correct": [o.correct for o in full], "accuracy": 100.0 * np.mean([o.correct for o in full]),
                     "text_nll": full_nll},  # fmt: skip
            "methods": {},
        }
        write_json(out_path, result)
    full_correct, full_nll = result["full"]["correct"], result["full"]["text_nll"]
    if len(full_correct) != len(items):
        raise SystemExit(f"--resume: the stored run has {len(full_correct)} items, these settings {len(items)}")
    result["settings"]["budgets"] = sorted({*result["settings"]["budgets"], *budgets})  # --resume may add budgets

    scores: dict = {}
    for method in methods:
        row = result["methods"].setdefault(method, {"cells": {}})
        if all(f"{b:g}" in row["cells"] for b in budgets):
            continue
        scored, s, seconds = profile(method, model, data, ref, scores)
        row["profile_seconds"] = round(seconds, 1)
        make = lambda cand, sc=scored, st=s: C._candidate_policy(info, cand, sc, st)  # noqa: E731
        measure = C.Measurer(model, info, data.calib, ref, make, False)
        for b in budgets:
            if f"{b:g}" in row["cells"]:
                continue
            t = time.perf_counter()
            at_b = scored
            if s.passes == 2:  # linearised again at this budget's first choice (compile --passes 2)
                at_b = C.rescore(model, data, ref, replace(s, kv_budget=b), scored, info, esize)
            rescore_s = time.perf_counter() - t
            cand = C.at_kv_budget(at_b, info, s, b, esize)
            loss = measure(cand)
            policy = make(cand)
            m = applied_copy(model, policy)
            outs = answers(m, codec.decode, items)
            with torch.no_grad():
                nll = [float(O.text_nll(m, x, suite.text_from).double().mean()) for x in texts]
            del m
            row["cells"][f"{b:g}"] = {
                "kv_fraction": round(policy.kv_fraction(4096, dtype_bytes=esize), 6),
                "heads_by_bits": heads_by_bits(policy),
                "retrieval_heads": policy.num_retrieval,
                "windows": sorted({policy.head_window(li, h)[1] for li, r in enumerate(policy.layers)
                                   for h, spec in enumerate(r) if not spec.is_retrieval}),  # fmt: skip
                "objective": loss.as_dict(),
                "paired": paired(full_correct, [o.correct for o in outs]),
                "ppl_ratio": round(float(np.exp(np.mean(nll) - np.mean(full_nll))), 5),
                "seconds": round(time.perf_counter() - t, 1),
                "rescore_seconds": round(rescore_s, 1),
            }
            write_json(out_path, result)
            c = row["cells"][f"{b:g}"]
            lost = f"{c['paired']['lost']:>2}/{c['paired']['items']}"
            print(f"{method:<15} KV {100 * c['kv_fraction']:5.1f}%  lost {lost}  ppl x{c['ppl_ratio']:.4f}"
                  f"  objective {c['objective']['value']:.4f}", flush=True)  # fmt: skip
    print(format_table(result))
    print(f"Pareto curves: {draw(result, out_path.with_suffix('.png'))}")
    return 0


def heads_by_bits(policy) -> dict[str, int]:
    """How many KV heads are retrieval / streaming at each KV bits value, e.g. {"retrieval@8": 40}."""
    out: dict[str, int] = {}
    for li, row in enumerate(policy.layers):
        for h, spec in enumerate(row):
            key = f"{'retrieval' if spec.is_retrieval else 'streaming'}@{policy.head_bits(li, h)}"
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def format_table(result: dict) -> str:
    budgets = [f"{b:g}" for b in result["settings"]["budgets"]]
    head = f"{'method':<15} {'profile s':>9} " + " ".join(f"{'@' + b:>24}" for b in budgets)
    lines = [f"cells: KV % at 4K / items lost of {result['settings']['items']} (paired vs full) / perplexity ratio",
             head, "-" * len(head)]  # fmt: skip
    for name, row in result["methods"].items():
        cells = []
        for b in budgets:
            c = row["cells"].get(b)
            cells.append(f"{100 * c['kv_fraction']:5.1f}% / {c['paired']['lost']:>2} / x{c['ppl_ratio']:.3f}"
                         if c else "-")  # fmt: skip
        seconds = row.get("profile_seconds", float("nan"))
        lines.append(f"{name:<15} {seconds:>9.0f} " + " ".join(f"{x:>24}" for x in cells))
    lines.append(f"full model: {result['full']['accuracy']:.1f}% of the held-out items")
    return "\n".join(lines)


def draw(result: dict, path: Path) -> Path:
    """Two panels against KV fraction at 4K: items lost (paired) and perplexity ratio, one line per method."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    try:
        for name, row in result["methods"].items():
            cells = sorted(row["cells"].values(), key=lambda c: c["kv_fraction"])
            if not cells:
                continue
            x = [100 * c["kv_fraction"] for c in cells]
            style = dict(marker="o", label=name, linewidth=2.2 if name.startswith("causal") else 1.2)
            a.plot(x, [c["paired"]["lost"] for c in cells], **style)
            b.plot(x, [c["ppl_ratio"] for c in cells], **style)
        n = result["settings"]["items"]
        a.set(xlabel="KV cache at 4K tokens, % of full", ylabel=f"answers lost of {n} (paired vs full)",
              title="held-out answers lost")  # fmt: skip
        b.set(xlabel="KV cache at 4K tokens, % of full", ylabel="perplexity / full model's",
              title="held-out long-text perplexity")  # fmt: skip
        b.axhline(1.02, color="grey", linestyle=":", linewidth=1)
        for ax in (a, b):
            ax.grid(alpha=0.3)
        b.legend(fontsize=8)
        fig.suptitle(f"{result['model']}: selection methods at equal KV bytes", fontsize=10)
        fig.tight_layout()
        return atomic_write(path, writer=lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
