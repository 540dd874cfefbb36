"""`gates`: learned per-KV-head gates, distilled from the full model (DuoAttention-style), on a CPU.

Every KV head h of layer l gets a gate g[l, h] in [0, 1], shared by its query group; the
gated model's attention output for that head is

    out = g * full(q, k, v) + (1 - g) * streaming(q, k, v; sink, window)

with `full` = causal SDPA and `streaming` = the runtime's own sink + window op, so the
student sees exactly the attention a policy would run. Model weights stay frozen; only the
gates take gradients. Loss, on the answer positions of needle tasks (teacher-forced):

    L = ||h_student - h_full||^2 / ||h_full||^2  +  l1 * mean(g)

where h = the model's final hidden states (after the last norm). Hidden states, not
logits, as in DuoAttention: they carry every direction the next layers (and later answer
tokens) read, not only the top logit; they need no [S, vocab] projection; and after the
final norm their scale is the same across models, so one `l1` weight fits all.

What makes it cheap (SmolLM2-135M trains in minutes on 2 CPU cores, not GPU-hours):
- short tasks (the 1K profiling tasks) with sink + window scaled to 1/8 of the shortest task
  (`scaled_window`), so the needle lies outside the window as it would at 8K+;
- teacher hidden states computed once per task, not per step; gradient only into the gates
  (weights frozen: backward computes no weight gradients);
- a high learning rate and few steps; training stops once the head ranking stops changing
  (Spearman rho between checks >= `stable_rho`, `patience` checks in a row).

Gates start at 1 (the full model, loss 0) and L1 pulls them all down; a head the answer
needs is pushed back up by the distillation loss. Gates saturate at 0 and 1, and ties would
make the ranking arbitrary, so the score is the gate plus `TIE_WEIGHT` * the normalised
mean *pull* of the distillation loss on it (-dL_distill/dg, how much the loss wants the
head full). Everything is deterministic: constant init, seeded task order, no dropout.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from headpolicy.models import get_adapter
from headpolicy.policies.stats import spearman
from headpolicy.profiler.probes import kv_group
from headpolicy.profiler.tasks import NEEDLE_KINDS
from headpolicy.runtime.attention import model_attention, padding_mask, streaming_heads
from headpolicy.runtime.state import applied

from . import register_scorer

GATES_NAME = "headpolicy_gates"
TIE_WEIGHT = 1e-3
WINDOW_SHARE = 8  # training sink + window <= shortest task length / WINDOW_SHARE


@dataclass
class GateSettings:
    max_steps: int = 40
    min_steps: int = 12  # never less than 1/lr (see train_gates)
    lr: float = 0.1  # Adam; with ~1 step per task a gate can cross [0, 1] in ~10 steps
    l1: float = 0.05
    check_every: int = 2
    stable_rho: float = 0.99  # Spearman rho between consecutive checks that counts as "unchanged"
    patience: int = 3
    max_tasks: int = 16  # distinct tasks cycled through (teacher states are cached per task)
    seed: int = 0


@dataclass
class GateRun:
    """Result of `train_gates`. gates/pull/scores: float32 [layers, kv_heads]."""

    gates: np.ndarray
    pull: np.ndarray
    scores: np.ndarray
    steps: int
    stopped_early: bool
    sink: int
    window: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # distillation loss per step
    rhos: list[float] = field(default_factory=list)  # Spearman rho at each check


_ACTIVE: list[tuple] = []  # (gates [L, Hkv], sink, window, the model's own sliding windows) of the innermost block


def _streaming(q, k, v, sink: int, window: int, scale: float) -> torch.Tensor:
    """The runtime's streaming op on an unpadded sequence. q: [B, Hq, S, D]; k, v: [B, Hkv, T, D]."""
    B, S, T = q.shape[0], q.shape[2], k.shape[2]
    ranks = torch.arange(T, device=q.device).expand(B, T)
    return streaming_heads(q, k, v, ranks, ranks[:, T - S :], sink, window, scale)


def gated_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """g * full + (1 - g) * streaming per KV head. query: [B, Hq, S, D]; key/value: [B, Hkv, T, D]."""
    gates, sink, window, native = _ACTIVE[-1]
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("gate training runs unpadded sequences only")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    S, T = query.shape[2], key.shape[2]
    if S != T:
        raise ValueError("gate training runs whole sequences without a KV cache (use_cache=False)")
    own = None if native is None else native[module.layer_idx]
    full = model_attention(query, key, value, scale, own)
    if own is not None or T <= sink + window:  # the model's own sliding layer; or every key seen anyway
        return full.transpose(1, 2).contiguous(), None
    stream = _streaming(query, key, value, sink, window, scale)
    group = query.shape[1] // key.shape[1]
    g = gates[module.layer_idx].repeat_interleave(group)[None, :, None, None]  # [1, Hq, 1, 1]
    out = stream + g * (full - stream)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GATES_NAME, gated_attention)
AttentionMaskInterface.register(GATES_NAME, padding_mask)


@contextlib.contextmanager
def gated(model, gates: torch.Tensor, sink: int, window: int):
    """Run `model` inside the block with gated attention; weights frozen (requires_grad restored after)."""
    if applied(model) is not None:
        raise ValueError("profile the unmodified model: this one already has a headpolicy applied")
    previous = model.config._attn_implementation
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    model.set_attn_implementation(GATES_NAME)
    _ACTIVE.append((gates, sink, window, get_adapter(model).native_windows(model)))
    try:
        yield model
    finally:
        _ACTIVE.pop()
        model.set_attn_implementation(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


def scaled_window(sink: int, window: int, length: int) -> tuple[int, int]:
    """Sink/window for training on `length`-token tasks: same sink:window ratio, sum <= length / 8."""
    cap = max(2, length // WINDOW_SHARE)
    if sink + window <= cap:
        return sink, window
    f = cap / (sink + window)
    return max(1, round(sink * f)), max(1, round(window * f))


def _final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the last norm) [B, S, hidden], without the LM head."""
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state


def _answer_rows(task) -> slice:
    """Positions whose next token is an answer token (teacher forcing)."""
    return slice(task.prompt_len - 1, task.prompt_len - 1 + len(task.answer_ids))


def _scores(gates: torch.Tensor, pull: torch.Tensor) -> np.ndarray:
    p = pull / (pull.abs().max() + 1e-12)
    return (gates.detach() + TIE_WEIGHT * p).float().numpy()


def train_gates(
    model, tasks, *, sink: int, window: int, settings: GateSettings | None = None, progress=None
) -> GateRun:
    """Learn one gate per KV head on the needle tasks in `tasks`. Returns a GateRun ([L, Hkv] arrays)."""
    s = settings or GateSettings()
    t0 = time.perf_counter()
    needle = [t for t in tasks if t.kind in NEEDLE_KINDS and t.answer_ids]
    if not needle:
        raise ValueError("gate training needs passkey/multikey tasks with answers")
    # multikey first: distractor keys make the answer depend on *which* far tokens a head reads
    needle = sorted(needle, key=lambda t: (t.kind != "multikey", t.name()))[: s.max_tasks]
    random.Random(s.seed).shuffle(needle)
    tr_sink, tr_window = scaled_window(sink, window, min(t.prompt_len for t in needle))
    layers, _, kv_heads = kv_group(model)
    device = next(model.parameters()).device

    with torch.no_grad():  # teacher: the unmodified model, once per task
        targets = [
            _final_hidden(model, t.tensor(with_answer=True).to(device))[0, _answer_rows(t)].float() for t in needle
        ]

    gates = torch.ones(layers, kv_heads, device=device, requires_grad=True)
    opt = torch.optim.Adam([gates], lr=s.lr)
    pull = torch.zeros(layers, kv_heads, dtype=torch.float64)
    losses, rhos = [], []
    prev, stable, step, stopped = None, 0, 0, False
    # An unneeded gate takes ~1/lr Adam steps to fall from 1 to 0; until then every gate may be
    # falling in step and the ranking looks stable without meaning anything.
    min_steps = max(s.min_steps, math.ceil(1.0 / s.lr))
    if progress is not None and hasattr(progress, "reset"):
        progress.reset(total=s.max_steps)
    with gated(model, gates, tr_sink, tr_window):
        for step in range(1, s.max_steps + 1):
            i = (step - 1) % len(needle)
            t, target = needle[i], targets[i]
            h = _final_hidden(model, t.tensor(with_answer=True).to(device))[0, _answer_rows(t)].float()
            distill = (h - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=False)
            if distill.requires_grad:  # False only when every task fits inside sink + window
                distill.backward()
            with torch.no_grad():
                pull -= gates.grad.double().cpu()
                gates.grad += s.l1 / gates.numel() * (gates > 0).float()  # d/dg of l1 * mean(|g|), g >= 0
            opt.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            losses.append(float(distill.detach()))
            if progress is not None:
                progress.update(1)
                if hasattr(progress, "set_postfix"):
                    progress.set_postfix(loss=f"{losses[-1]:.4f}", open=f"{int((gates > 0.5).sum())}/{gates.numel()}")
            if step % s.check_every == 0:
                cur = _scores(gates, pull)
                if prev is not None:
                    rhos.append(1.0 if np.array_equal(prev, cur) else float(np.nan_to_num(spearman(prev, cur))))
                    stable = stable + 1 if rhos[-1] >= s.stable_rho else 0
                prev = cur
                if step >= min_steps and stable >= s.patience:
                    stopped = True
                    break
    g = gates.detach().cpu()
    return GateRun(
        gates=g.float().numpy(),
        pull=(pull / max(step, 1)).float().numpy(),
        scores=_scores(g, pull),
        steps=step,
        stopped_early=stopped,
        sink=tr_sink,
        window=tr_window,
        seconds=time.perf_counter() - t0,
        losses=losses,
        rhos=rhos,
    )


@register_scorer("gates", kinds=NEEDLE_KINDS)
def gates_score(model, tasks, *, sink, window, progress=None, settings: GateSettings | None = None):
    """Learned gates (DuoAttention-style distillation of final hidden states), ties broken by the loss's pull."""
    return train_gates(model, tasks, sink=sink, window=window, settings=settings, progress=progress).scores
