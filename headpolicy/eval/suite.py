"""The eval suite: a policy against the full cache and baselines at the same sink/window.

Configurations, each run on the same tasks (passkey and multikey x lengths x depths, on a
haystack the model sampled itself, long enough that no haystack repeats):

    full        the unmodified model (full KV cache)
    policy      the policy under test (headpolicy.apply, split cache)
    streaming   every head streaming (StreamingLLM) at the policy's sink/window
    random      as many retrieval heads as the policy, drawn at random; mean over seeds

KV bytes are measured from the cache object after each task (float32 here) and reported
per length as the mean over that length's tasks.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from headpolicy.eval.baselines import random_policy, streaming_policy
from headpolicy.models import describe_model
from headpolicy.profiler import tasks as T
from headpolicy.runtime.generate import answers, applied_copy


@dataclass
class SuiteSettings:
    lengths: tuple[int, ...] = (2048, 4096)
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    kinds: tuple[str, ...] = ("passkey", "multikey")
    random_seeds: int = 2
    seed: int = 1  # task/haystack seed; compile uses 0
    haystack_tokens: int | None = None  # sampled pool size; default: the longest task


def suite_tasks(model, codec, s: SuiteSettings) -> list[T.Task]:
    pool = T.sample_haystack(model, codec, s.haystack_tokens or max(s.lengths), seed=s.seed)
    return T.task_grid(codec, kinds=s.kinds, lengths=s.lengths, depths=s.depths, seed=s.seed, pool=pool)


def run_suite(
    model, tokenizer, policy, settings: SuiteSettings | None = None, *, progress: bool = False, check_fingerprint=True
) -> dict:
    """Run every configuration; returns plain data (JSON-ready). check_fingerprint=False accepts a
    policy for the same shape but other weights."""
    from tqdm.auto import tqdm

    s = settings or SuiteSettings()
    codec = T.as_codec(tokenizer)
    info = describe_model(model)
    policy.check_model(info, check_fingerprint=check_fingerprint)
    tasks = suite_tasks(model, codec, s)
    configs: list[tuple[str, object]] = [
        ("full", None),
        ("policy", policy),
        ("streaming", streaming_policy(info, sink=policy.sink, window=policy.window)),
    ]
    for i in range(s.random_seeds):
        configs.append((f"random/{i}", random_policy(info, policy.num_retrieval, seed=1000 + i,
                                                     sink=policy.sink, window=policy.window)))  # fmt: skip
    runs: dict[str, dict] = {}
    bar = tqdm(total=len(configs) * len(tasks), desc="eval", disable=not progress, dynamic_ncols=True)
    for name, pol in configs:
        t0 = time.perf_counter()
        m = model if pol is None else applied_copy(model, pol, check_fingerprint=check_fingerprint)
        bar.set_description(f"eval {name}")
        outs = answers(m, codec.decode, tasks, progress=bar)
        del m
        cells = [
            {"kind": o.task.kind, "length": o.task.length, "depth": o.task.depth, "correct": o.correct,
             "output": o.output, "kv_bytes": o.kv_bytes}
            for o in outs
        ]  # fmt: skip
        heads = info.num_layers * info.num_kv_heads if pol is None else pol.num_retrieval
        runs[name] = {"cells": cells, "seconds": round(time.perf_counter() - t0, 1), "retrieval_heads": heads}
    bar.close()
    return summarise(runs, s, policy)


def _by(cells: Sequence[dict], key) -> dict:
    groups = defaultdict(list)
    for c in cells:
        groups[key(c)].append(c)
    return groups


def summarise(runs: dict[str, dict], s: SuiteSettings, policy) -> dict:
    """Accuracy per (config, length, depth), per length, overall; KV bytes per length."""
    names = ["full", "policy", "streaming"]
    random_names = [n for n in runs if n.startswith("random/")]
    table: dict[str, dict] = {}
    for name in names + random_names:
        cells = runs[name]["cells"]
        per_len = {}
        for length, group in sorted(_by(cells, lambda c: c["length"]).items()):
            depths = {f"{d:.2f}": 100.0 * sum(c["correct"] for c in g) / len(g)
                      for d, g in sorted(_by(group, lambda c: c["depth"]).items())}  # fmt: skip
            per_len[str(length)] = {
                "accuracy": 100.0 * sum(c["correct"] for c in group) / len(group),
                "by_depth": depths,
                "kv_bytes": int(sum(c["kv_bytes"] for c in group) / len(group)),
            }
        table[name] = {"by_length": per_len, "accuracy": 100.0 * sum(c["correct"] for c in cells) / len(cells),
                       "retrieval_heads": runs[name]["retrieval_heads"], "seconds": runs[name]["seconds"],
                       "cells": cells}  # fmt: skip
    if random_names:
        mean = {"by_length": {}, "retrieval_heads": policy.num_retrieval, "seeds": len(random_names)}
        for length in table[random_names[0]]["by_length"]:
            rs = [table[n]["by_length"][length] for n in random_names]
            mean["by_length"][length] = {
                "accuracy": sum(r["accuracy"] for r in rs) / len(rs),
                "by_depth": {d: sum(r["by_depth"][d] for r in rs) / len(rs) for d in rs[0]["by_depth"]},
                "kv_bytes": int(sum(r["kv_bytes"] for r in rs) / len(rs)),
            }
        mean["accuracy"] = sum(table[n]["accuracy"] for n in random_names) / len(random_names)
        table["random"] = mean
    for row in table.values():
        for length, cell in row["by_length"].items():
            full = table["full"]["by_length"][length]["kv_bytes"]
            cell["kv_fraction"] = cell["kv_bytes"] / full if full else None
    return {
        "settings": {
            "lengths": list(s.lengths),
            "depths": list(s.depths),
            "kinds": list(s.kinds),
            "random_seeds": s.random_seeds,
            "seed": s.seed,
        },
        "policy": {
            "model": policy.model.name,
            "retrieval_heads": policy.num_retrieval,
            "num_heads": policy.num_heads,
            "sink": policy.sink,
            "window": policy.window,
            "method": policy.provenance.method,
        },
        "configs": table,
    }


def format_table(result: dict) -> str:
    """Rows: configuration x length; columns: accuracy per depth, mean, KV MiB, KV % of full."""
    cfg = result["configs"]
    order = [n for n in ("full", "policy", "streaming", "random") if n in cfg]
    depths = [f"{d:.2f}" for d in result["settings"]["depths"]]
    head = f"{'config':<10} {'heads':>5} {'length':>6} " + " ".join(f"d={d:>4}" for d in depths)
    head += f" {'acc %':>6} {'KV MiB':>8} {'KV %':>6}"
    lines = [head, "-" * len(head)]
    for name in order:
        row = cfg[name]
        for length, cell in row["by_length"].items():
            accs = " ".join(f"{cell['by_depth'].get(d, float('nan')):>6.0f}" for d in depths)
            frac = cell.get("kv_fraction")
            lines.append(
                f"{name:<10} {row['retrieval_heads']:>5} {length:>6} {accs} {cell['accuracy']:>6.1f} "
                f"{cell['kv_bytes'] / 2**20:>8.1f} {'' if frac is None else f'{100 * frac:.1f}':>6}"
            )
    if "random" in cfg:
        lines.append(f"(random = mean of {cfg['random']['seeds']} seeds)")
    return "\n".join(lines)
