"""The eval suite: what a policy loses against the full model, on data compile never saw.

    result = run_suite(model, tokenizer, policy)     # JSON-ready dict; format_table(result) prints it

Items: needle tasks (pass key numbers, words, multi-token codes, several keys) x depths x seeds
at each length, worded as compile never words them ("B") and hidden in a text compile never
reads (Moby-Dick; profiler/data/README.md). Every configuration generates its answers through
the real runtime (runtime/generate.py: apply + the split cache), greedy, on the same items:

    full        the unmodified model (full KV cache)
    policy      the policy under test
    streaming   (--baselines) every head streaming at the policy's default sink/window
    random      (--baselines) as many retrieval heads as the policy, drawn at random

Reported per length: accuracy, and *paired* against the full model: items lost (full right,
policy wrong) and gained, with a 95% bootstrap interval of the accuracy difference; the KV
bytes measured from the cache; and the perplexity ratio on long natural text (teacher-forced,
NLL from `text_from` on), which generation-based accuracy cannot see.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from headpolicy.eval.baselines import random_policy, streaming_policy
from headpolicy.io import settings_data
from headpolicy.models import describe_model
from headpolicy.profiler import objective as O
from headpolicy.profiler import tasks as T
from headpolicy.runtime.generate import answers, applied_copy

BASELINES = ("streaming", "random")


@dataclass
class SuiteSettings:
    lengths: tuple[int, ...] = (2048, 4096)
    kinds: tuple[str, ...] = T.NEEDLE_KINDS
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    seeds: int = 3  # items per length = kinds x depths x seeds (60 by default)
    text_lengths: tuple[int, ...] = (4096, 8192)  # long natural text, one chunk per length per text
    texts: int = 2
    text_from: int = 1024
    baselines: tuple[str, ...] = ()
    seed: int = 1  # compile uses 0
    wording: str = "B"
    prose: str = T.HELDOUT_PROSE

    @property
    def items_per_length(self) -> int:
        return len(self.kinds) * len(self.depths) * self.seeds


def suite_tasks(codec, s: SuiteSettings) -> list[T.Task]:
    pool = T.prose_pool(codec, s.prose)
    out = []
    for k in range(s.seeds):
        out += T.task_grid(codec, kinds=s.kinds, lengths=s.lengths, depths=s.depths, seed=s.seed * 100 + k,
                           pool=pool, wording=s.wording)  # fmt: skip
    return out


def suite_texts(codec, s: SuiteSettings, limit: int | None) -> list[tuple[int, ...]]:
    """`texts` chunks per text length, from seeded offsets of the held-out prose (lengths beyond
    the model's context are skipped)."""
    pool = T.prose_pool(codec, s.prose)
    rng = np.random.default_rng(s.seed)
    out = []
    for n in s.text_lengths:
        if limit is not None and n > limit:
            continue
        for _ in range(s.texts):
            start = int(rng.integers(0, len(pool) - n))
            out.append(tuple(pool[start : start + n]))
    return out


def run_suite(
    model,
    tokenizer,
    policy,
    settings: SuiteSettings | None = None,
    *,
    progress: bool = False,
    check_fingerprint=True,
    full_from: dict | None = None,
) -> dict:
    """Run every configuration on the same items; returns plain data (JSON-ready).
    check_fingerprint=False accepts a policy for the same shape but other weights. full_from: an
    earlier result (of this function) whose full-model run is taken instead of running it again,
    when it was made on the same weights, settings and items (`reused_full`)."""
    from tqdm.auto import tqdm

    from headpolicy.runtime.generate import context_limit

    s = settings or SuiteSettings()
    codec = T.as_codec(tokenizer)
    info = describe_model(model)
    policy.check_model(info, check_fingerprint=check_fingerprint)
    tasks = suite_tasks(codec, s)
    texts = suite_texts(codec, s, context_limit(model))
    runs: dict[str, dict] = {}
    if full_from is not None:
        runs["full"] = reused_full(full_from, s, info.name, info.fingerprint, tasks, texts)
    configs: list[tuple[str, object]] = [("full", None), ("policy", policy)][len(runs) :]
    if "streaming" in s.baselines:
        configs.append(("streaming", streaming_policy(info, sink=policy.sink, window=policy.window)))
    if "random" in s.baselines:
        configs.append(("random", random_policy(info, policy.num_retrieval, seed=1000, sink=policy.sink,
                                                window=policy.window)))  # fmt: skip
    bar = tqdm(total=len(configs) * (len(tasks) + len(texts)), desc="eval", disable=not progress, dynamic_ncols=True)
    for name, pol in configs:
        t0 = time.perf_counter()
        m = model if pol is None else applied_copy(model, pol, check_fingerprint=check_fingerprint)
        bar.set_description(f"eval {name}")
        outs = answers(m, codec.decode, tasks, progress=bar)
        nll = []
        with torch.no_grad():
            for text in texts:
                nll.append(O.text_nll(m, text, s.text_from).double())
                bar.update(1)
        del m
        cells = [
            {"kind": o.task.kind, "length": o.task.length, "depth": o.task.depth, "seed": o.task.seed,
             "correct": o.correct, "answer": o.task.answer, "output": o.output, "kv_bytes": o.kv_bytes}
            for o in outs
        ]  # fmt: skip
        heads = info.num_layers * info.num_kv_heads if pol is None else pol.num_retrieval
        runs[name] = {"cells": cells, "seconds": round(time.perf_counter() - t0, 1), "retrieval_heads": heads,
                      "text_nll": [float(x.mean()) for x in nll], "text_lengths": [len(t) for t in texts]}  # fmt: skip
    bar.close()
    result = summarise(runs, s, policy)
    result["model"] = {"name": info.name, "fingerprint": info.fingerprint}
    if full_from is not None:
        result["configs"]["full"]["reused"] = True
    return result


def reused_full(previous: dict, s: SuiteSettings, name: str, fingerprint: str, tasks, texts) -> dict:
    """The full-model run of an earlier result, checked to stand for this one: the same weights,
    the same settings (baselines aside), the same items and answers, the same texts.
    Raises ResultsMismatchError naming the first difference."""
    from headpolicy.errors import ResultsMismatchError

    try:
        full = previous["configs"]["full"]
        before = previous["settings"]
        cells, nll = full["cells"], full["text_nll"]
    except (KeyError, TypeError) as e:
        raise ResultsMismatchError(f"not an eval result with a full-model run (missing {e})") from None
    theirs = previous.get("model", {}).get("fingerprint")
    if theirs is None and previous.get("policy", {}).get("model") == name:  # results from before fingerprints
        warnings.warn("the saved full-model results record no weights fingerprint (an older file): "
                      "their model name, settings, items and answers are checked", stacklevel=2)  # fmt: skip
    elif theirs != fingerprint:
        raise ResultsMismatchError(f"full-model results from other weights (fingerprint {theirs!r}, "
                                   f"this model {fingerprint!r})")  # fmt: skip
    now = settings_data(s)
    for key in sorted(set(now) | set(before)):
        if key != "baselines" and now.get(key) != before.get(key):
            raise ResultsMismatchError(f"full-model results made with {key}={before.get(key)!r}, "
                                       f"this run has {now.get(key)!r}")  # fmt: skip
    items = [(t.kind, t.length, t.depth, t.seed, t.answer) for t in tasks]
    saved = [(c["kind"], c["length"], c["depth"], c["seed"], c["answer"]) for c in cells]
    if saved != items:
        raise ResultsMismatchError(f"full-model results for other items ({len(saved)} saved, {len(items)} now, "
                                   "or other answers: another tokenizer?)")  # fmt: skip
    lengths = [len(t) for t in texts]
    if full.get("text_lengths", lengths) != lengths or len(nll) != len(lengths):
        raise ResultsMismatchError(f"full-model perplexity on other texts ({len(nll)} saved, {len(lengths)} now)")
    return {"cells": cells, "seconds": full.get("seconds", 0.0), "retrieval_heads": full["retrieval_heads"],
            "text_nll": nll, "text_lengths": lengths}  # fmt: skip


# ---- paired statistics --------------------------------------------------------------------------------
def paired(full: Sequence[bool], other: Sequence[bool], *, resamples: int = 10_000, seed: int = 0) -> dict:
    """Items lost (full right, other wrong) and gained, and the accuracy difference (other - full, in
    points) with a 95% percentile bootstrap interval over items (the pairs are resampled together)."""
    f, o = np.asarray(full, dtype=bool), np.asarray(other, dtype=bool)
    d = o.astype(np.int8) - f.astype(np.int8)
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1) if len(d) else np.zeros(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"items": int(len(d)), "lost": int((f & ~o).sum()), "gained": int((~f & o).sum()),
            "diff_points": round(100 * float(d.mean()) if len(d) else 0.0, 2),
            "ci95_points": [round(100 * float(lo), 2), round(100 * float(hi), 2)]}  # fmt: skip


def summarise(runs: dict[str, dict], s: SuiteSettings, policy) -> dict:
    """Per configuration and length: accuracy, paired loss against the full model, KV bytes; text perplexity."""
    full = runs["full"]
    table: dict[str, dict] = {}
    for name, run in runs.items():
        per_len = {}
        for length in s.lengths:
            mine = [c for c in run["cells"] if c["length"] == length]
            ref = [c for c in full["cells"] if c["length"] == length]
            per_len[str(length)] = {
                "accuracy": round(100.0 * sum(c["correct"] for c in mine) / max(len(mine), 1), 2),
                "paired": paired([c["correct"] for c in ref], [c["correct"] for c in mine]),
                "kv_bytes": int(sum(c["kv_bytes"] for c in mine) / max(len(mine), 1)),
                "by_kind": {k: round(100.0 * np.mean([c["correct"] for c in mine if c["kind"] == k]), 1)
                            for k in s.kinds},  # fmt: skip
            }
        ppl = {}
        for n in sorted(set(run["text_lengths"])):
            mine = [x for x, m in zip(run["text_nll"], run["text_lengths"], strict=True) if m == n]
            base = [x for x, m in zip(full["text_nll"], full["text_lengths"], strict=True) if m == n]
            ppl[str(n)] = round(float(np.exp(np.mean(mine) - np.mean(base))), 5)
        table[name] = {"by_length": per_len, "ppl_ratio": ppl, "retrieval_heads": run["retrieval_heads"],
                       "seconds": run["seconds"], "cells": run["cells"], "text_nll": run["text_nll"],
                       "text_lengths": run["text_lengths"]}  # fmt: skip
    for row in table.values():
        for length, cell in row["by_length"].items():
            base = table["full"]["by_length"][length]["kv_bytes"]
            cell["kv_fraction"] = round(cell["kv_bytes"] / base, 6) if base else None
    return {
        "settings": settings_data(s),
        "policy": {
            "model": policy.model.name,
            "retrieval_heads": policy.num_retrieval,
            "num_heads": policy.num_heads,
            "sink": policy.sink,
            "window": policy.window,
            "method": policy.provenance.method,
            "kv_fraction_4096": round(policy.kv_fraction(4096), 6),
        },
        "configs": table,
    }


def format_table(result: dict) -> str:
    """Rows: configuration x length: accuracy, paired lost/gained with the 95% interval, KV; perplexity ratios."""
    cfg = result["configs"]
    head = f"{'config':<10} {'heads':>5} {'length':>6} {'acc %':>6} {'lost':>4} {'gained':>6} {'diff (95% CI)':>22} " \
           f"{'KV MiB':>8} {'KV %':>6}"  # fmt: skip
    lines = [head, "-" * len(head)]
    for name, row in cfg.items():
        for length, cell in row["by_length"].items():
            p = cell["paired"]
            ci = f"{p['diff_points']:+.1f} [{p['ci95_points'][0]:+.1f}, {p['ci95_points'][1]:+.1f}]"
            frac = cell.get("kv_fraction")
            lines.append(
                f"{name:<10} {row['retrieval_heads']:>5} {length:>6} {cell['accuracy']:>6.1f} {p['lost']:>4} "
                f"{p['gained']:>6} {ci:>22} {cell['kv_bytes'] / 2**20:>8.1f} "
                f"{'' if frac is None else f'{100 * frac:.1f}':>6}"
            )
    n = next(iter(next(iter(cfg.values()))["by_length"].values()))["paired"]["items"]
    lines.append(f"({n} items per length; lost/gained: paired against the full model on the same items)")
    lines.append("perplexity ratio vs full (long held-out text, NLL after the first "
                 f"{result['settings']['text_from']} tokens): " + "; ".join(
                     f"{name} " + ", ".join(f"{k} tokens x{v:.4f}" for k, v in row["ppl_ratio"].items())
                     for name, row in cfg.items() if name != "full"))  # fmt: skip
    return "\n".join(lines)
