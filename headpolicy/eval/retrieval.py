"""Retrieval accuracy of a model, unmodified or with a policy applied through the real runtime.

    acc = accuracy(model, tokenizer, tasks)                       # full KV cache
    acc = accuracy(model, tokenizer, tasks, policy=policy)        # headpolicy.apply + split cache

A task is answered correctly when the greedy continuation (decoded, leading space
stripped) starts with the task's answer text. With a policy, the model is deep-copied,
the copy gets `apply(copy, policy)` and `generate()` runs on a SplitKVCache, so what is
measured is exactly what a user of the policy gets.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from headpolicy.profiler.tasks import Task, as_codec


@dataclass(frozen=True)
class Outcome:
    task: Task
    correct: bool
    output: str
    kv_bytes: int  # cache bytes after generation (measured from the cache object)


def policy_model(model, policy, *, check_fingerprint: bool = True):
    """A copy of `model` with `policy` applied (the original stays unmodified)."""
    from headpolicy.runtime.apply import apply

    clone = copy.deepcopy(model)
    return apply(clone, policy, check_fingerprint=check_fingerprint)


def _cache_bytes(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "kv_bytes"):
        return int(cache.kv_bytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


@torch.no_grad()
def run_task(model, codec, task: Task, *, extra_tokens: int = 1) -> Outcome:
    """Greedy-decode len(answer) + extra_tokens tokens after the prompt."""
    from transformers import DynamicCache

    from headpolicy.runtime.cache import SplitKVCache

    codec = as_codec(codec)
    device = next(model.parameters()).device
    ids = task.tensor().to(device)
    cache = SplitKVCache.for_model(model) if getattr(model, "_headpolicy", None) else DynamicCache()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=len(task.answer_ids) + extra_tokens,
        do_sample=False,
        past_key_values=cache,
        pad_token_id=0,
        top_p=None,
        top_k=None,
        temperature=None,
    )
    text = codec.decode(out[0, ids.shape[1] :].tolist())
    correct = text.strip().startswith(task.answer.strip()) if task.answer else False
    return Outcome(task, correct, text, _cache_bytes(cache))


def run_tasks(model, codec, tasks: Sequence[Task], *, progress=None, max_misses: int | None = None) -> list[Outcome]:
    """Run `tasks` in order; with `max_misses`, stop after the first miss beyond it."""
    outs, misses = [], 0
    for t in tasks:
        outs.append(run_task(model, codec, t))
        misses += not outs[-1].correct
        if progress is not None:
            progress.update(1)
        if max_misses is not None and misses > max_misses:
            break
    return outs


def outcomes(model, codec, tasks: Sequence[Task], *, policy=None, progress=None, max_misses=None) -> list[Outcome]:
    """`run_tasks` on `model`, or on a copy with `policy` applied."""
    m = model if policy is None else policy_model(model, policy)
    try:
        return run_tasks(m, codec, tasks, progress=progress, max_misses=max_misses)
    finally:
        if m is not model:
            del m


def accuracy(model, codec, tasks: Sequence[Task], *, policy=None, progress=None) -> float:
    """Percent of `tasks` answered correctly (0-100), with `policy` applied to a copy if given."""
    outs = outcomes(model, codec, tasks, policy=policy, progress=progress)
    return 100.0 * sum(o.correct for o in outs) / max(len(outs), 1)
