"""What a policy loses, measured teacher-forced against the full model: the selection objective.

A calibration set is needle tasks (prompt + answer, one forward each, no generation) and
long natural text. The full model runs it once (`reference`); a candidate policy runs it once
(`measure`) and is compared position by position:

    answer positions (the tokens that should follow each task's prompt):
      ans_drop       the answer's log-probability drop, full - policy (nats per answer token):
                     mean over tasks (`ans_drop`) and worst task (`ans_drop_max`)
      ans_kl         KL(full || policy) of the next-token distributions, mean per position
      ans_kept       share of tasks whose answer tokens all stay the policy's argmax (as they are the
                     full model's), among the tasks the full model itself answers
    natural text, positions from `text_from` on (once streaming heads have lost the start):
      text_dnll      NLL(policy) - NLL(full), nats per token; exp(text_dnll) is the perplexity ratio

`Loss.value = ans_drop + text_dnll` (both nats per token) is what selection minimises;
`Loss.within(tolerance)` is the pass/fail rule of `--target-drop`: perplexity within
tolerance %, answer likelihood within tolerance %, every answer kept. Only tasks the full
model answers count for the answer terms: a policy cannot keep an answer the model never had.

A policy with quantised heads (kv_bits 8/4) only shows its loss through a cache: a forward
without one attends its own tokens at full precision. Such a model is run as a prefill of the
context, then the measured positions in chunks of QUANT_CHUNK tokens over the split cache, so
each chunk reads everything before it as stored (quantised) and only its own tokens exactly,
close to decoding with a residual of that many tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from headpolicy.profiler.tasks import Task
from headpolicy.runtime.cache import SplitKVCache, cache_argument
from headpolicy.runtime.state import applied

QUANT_CHUNK = 128  # measured tokens per forward over a quantised cache


@dataclass(frozen=True)
class Calibration:
    """Needle tasks and natural text (token ids) a policy is measured on."""

    tasks: tuple[Task, ...]
    texts: tuple[tuple[int, ...], ...]
    text_from: int  # text NLL counts from this position on

    def __post_init__(self):
        if any(len(t) <= self.text_from + 1 for t in self.texts):
            raise ValueError(f"every text must be longer than text_from + 1 = {self.text_from + 1} tokens")


@dataclass
class Reference:
    """The full model's side of every comparison, computed once per calibration set."""

    ans_logp: list[torch.Tensor]  # per task: log-softmax [n_answer, V] at its answer positions
    answered: list[bool]  # per task: the full model's argmax is the answer at every position
    text_nll: list[torch.Tensor]  # per text: NLL per position from text_from on [n]


@dataclass(frozen=True)
class Loss:
    ans_drop: float
    ans_drop_max: float
    ans_kl: float
    ans_kept: float
    text_dnll: float
    tasks: int  # answered tasks the answer terms average over

    @property
    def value(self) -> float:
        return self.ans_drop + self.text_dnll

    @property
    def ppl_ratio(self) -> float:
        return math.exp(self.text_dnll)

    def within(self, tolerance: float) -> bool:
        """Perplexity and answer likelihood within `tolerance` percent of the full model's, every answer kept."""
        limit = math.log1p(tolerance / 100.0)
        return self.text_dnll <= limit and self.ans_drop <= limit and self.ans_kept >= 1.0

    def as_dict(self) -> dict:
        out = {k: round(getattr(self, k), 6) for k in ("ans_drop", "ans_drop_max", "ans_kl", "ans_kept", "text_dnll")}
        return out | {"value": round(self.value, 6), "ppl_ratio": round(self.ppl_ratio, 6), "tasks": self.tasks}

    def describe(self) -> str:
        return (
            f"perplexity x{self.ppl_ratio:.4f}, answer log-prob drop {self.ans_drop:.4f} nats/token "
            f"(worst {self.ans_drop_max:.3f}), answers kept {100 * self.ans_kept:.0f}%"
        )


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _last_logits(model: nn.Module, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits [keep, V] of the last `keep` positions of ids [1, T]: one forward, or, for a policy
    with quantised heads, a prefill of the rest and then chunks over the cache (module docstring)."""
    state = applied(model)
    if state is None or not state.policy.num_quantized:
        return model(ids, use_cache=False, logits_to_keep=keep).logits[0]
    cache, arg = SplitKVCache.for_model(model), cache_argument(model.forward)
    first = ids.shape[1] - keep
    if first:
        model(ids[:, :first], use_cache=True, logits_to_keep=1, **{arg: cache})
    chunks = [model(ids[:, a : a + QUANT_CHUNK], use_cache=True, **{arg: cache}).logits[0]
              for a in range(first, ids.shape[1], QUANT_CHUNK)]  # fmt: skip
    return torch.cat(chunks, dim=0)


def _answer_logp(model: nn.Module, task: Task) -> torch.Tensor:
    """log-softmax [n_answer, V] at the positions that predict the task's answer tokens."""
    ids = task.tensor(with_answer=True).to(_device(model))
    n = len(task.answer_ids)
    logits = _last_logits(model, ids, n + 1)[:n].float()
    return torch.log_softmax(logits, dim=-1)


def text_nll(model: nn.Module, text: Sequence[int], text_from: int) -> torch.Tensor:
    """NLL [n] of each token from position text_from + 1 on, given everything before it."""
    ids = torch.tensor([list(text)], device=_device(model))
    keep = ids.shape[1] - text_from  # logits at positions text_from .. T - 1 predict text_from + 1 .. T
    logits = _last_logits(model, ids, keep)[:-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, text_from + 1 :], reduction="none")


@torch.no_grad()
def reference(model: nn.Module, calib: Calibration, *, progress=None) -> Reference:
    """Run the full (unmodified) model over the calibration set once."""
    ans, answered, text = [], [], []
    for task in calib.tasks:
        logp = _answer_logp(model, task)
        ans.append(logp.cpu())
        answered.append(bool((logp.argmax(-1).cpu() == torch.tensor(task.answer_ids)).all()))
        if progress is not None:
            progress.update(1)
    for t in calib.texts:
        text.append(text_nll(model, t, calib.text_from).cpu())
        if progress is not None:
            progress.update(1)
    return Reference(ans, answered, text)


@torch.no_grad()
def measure(model: nn.Module, calib: Calibration, ref: Reference, *, progress=None) -> Loss:
    """The Loss of `model` (a policy applied to a copy of the reference model) on `calib`."""
    drops, kls, kept = [], [], []
    for task, full, ok in zip(calib.tasks, ref.ans_logp, ref.answered, strict=True):
        if ok:
            logp = _answer_logp(model, task).cpu()
            answer = torch.tensor(task.answer_ids)
            rows = torch.arange(len(answer))
            drops.append(float((full[rows, answer] - logp[rows, answer]).mean()))
            kls.append(float((full.exp() * (full - logp)).sum(-1).mean()))
            kept.append(bool((logp.argmax(-1) == full.argmax(-1)).all()))  # the full model's answer stays
        if progress is not None:
            progress.update(1)
    dnll = []
    for t, full in zip(calib.texts, ref.text_nll, strict=True):
        dnll.append(float((text_nll(model, t, calib.text_from).cpu() - full).mean()))
        if progress is not None:
            progress.update(1)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    return Loss(
        ans_drop=mean(drops),
        ans_drop_max=max(drops, default=0.0),
        ans_kl=mean(kls),
        ans_kept=mean([float(k) for k in kept]) if kept else 1.0,
        text_dnll=mean(dnll),
        tasks=len(drops),
    )
