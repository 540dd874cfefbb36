"""`causal`: each KV head's first-order effect on the selection objective when it alone streams.

For every KV head h and every streaming option (sink, window) o, estimate how much the
objective (profiler/objective.py: answer log-prob drop + text NLL increase, nats per token)
grows when h keeps only its sink + window instead of every token:

    est[h, o] = sum over calibration sequences i, query heads q of h, positions t:
                g_i[q, t] . (out_o[q, t] - out_full[q, t])

with g_i = d loss_i / d (attention output of q at t) from one forward and one backward of the
full model per sequence (loss_i = the sequence's share of the objective's NLL terms), and
out_o the head's attention output under option o, computed from the captured q, k, v with the
runtime's own streaming op. One forward + one backward per sequence gives every head and
every option at once; no policy is run. It is an estimate (linear in a change that is not
small), so selection uses it to order the choices and measurement decides (compile.py).

`estimate(...)` returns the whole [layers, kv_heads, options] table (signed); the registered
scorer gives the column of the policy's own sink/window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from headpolicy.models import describe_model
from headpolicy.profiler.objective import Calibration, Reference
from headpolicy.profiler.probes import kv_group
from headpolicy.profiler.tasks import NEEDLE_KINDS, Task
from headpolicy.runtime.attention import padding_mask, streaming_heads
from headpolicy.runtime.state import applied

from . import register_scorer

CAUSAL_NAME = "headpolicy_causal"
_ACTIVE: list[_Recorder] = []


@dataclass
class _Layer:
    q: torch.Tensor  # [B, Hq, S, D]
    k: torch.Tensor  # [B, Hkv, S, D]
    v: torch.Tensor
    out: torch.Tensor  # full attention output [B, Hq, S, D]
    delta: torch.Tensor  # zeros added to the output: its gradient is d loss / d output
    scale: float


class _Recorder:
    def __init__(self, native_windows):
        self.layers: dict[int, _Layer] = {}
        self.native = native_windows


def _full_attention(q, k, v, scale, window: int | None) -> torch.Tensor:
    """The unmodified model's attention of one layer (causal; a hybrid model's own sliding window)."""
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    T = k.shape[2]
    ranks = torch.arange(T, device=q.device).expand(q.shape[0], T)
    return streaming_heads(q, k, v, ranks, ranks, 0, window, scale)


def causal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Full attention that records q, k, v and leaves a hook for d loss / d output."""
    rec = _ACTIVE[-1]
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("causal profiling runs unpadded sequences only")
    if query.shape[2] != key.shape[2]:
        raise ValueError("causal profiling runs whole sequences without a KV cache (use_cache=False)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    layer = module.layer_idx
    native = None if rec.native is None else rec.native[layer]
    out = _full_attention(query, key, value, scale, native)
    delta = torch.zeros_like(out, requires_grad=True)
    rec.layers[layer] = _Layer(query.detach(), key.detach(), value.detach(), out.detach(), delta, scale)
    # d loss / d delta = d loss / d output, through every later layer (their attention included)
    return (out + delta).transpose(1, 2).contiguous(), None


AttentionInterface.register(CAUSAL_NAME, causal_attention)
AttentionMaskInterface.register(CAUSAL_NAME, padding_mask)


@contextlib.contextmanager
def _recording(model, native_windows):
    if applied(model) is not None:
        raise ValueError("profile the unmodified model: this one already has a headpolicy applied")
    previous = model.config._attn_implementation
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    rec = _Recorder(native_windows)
    model.set_attn_implementation(CAUSAL_NAME)
    _ACTIVE.append(rec)
    try:
        yield rec
    finally:
        _ACTIVE.pop()
        model.set_attn_implementation(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


def _sequences(calib: Calibration, ref: Reference | None) -> list[tuple[torch.Tensor, int, float]]:
    """(ids [1, T], first target position, weight) per sequence, weighted as in Loss.value."""
    tasks: list[Task] = [t for i, t in enumerate(calib.tasks) if ref is None or ref.answered[i]]
    out = []
    for t in tasks:
        ids = t.tensor(with_answer=True)
        out.append((ids, t.prompt_len, 1.0 / (len(tasks) * len(t.answer_ids))))
    for text in calib.texts:
        ids = torch.tensor([list(text)])
        out.append((ids, calib.text_from + 1, 1.0 / (len(calib.texts) * (len(text) - calib.text_from - 1))))
    return out


def estimate(
    model,
    calib: Calibration,
    options: Sequence[tuple[int, int]],
    *,
    ref: Reference | None = None,
    progress=None,
) -> np.ndarray:
    """First-order objective increase (nats per token) [layers, kv_heads, len(options)] of streaming
    each KV head alone with each (sink, window) option; 0 where a head's layer is the model's own
    sliding layer. `ref` restricts the answer terms to the tasks the full model answers."""
    layers, heads, kv_heads = kv_group(model)
    group = heads // kv_heads
    native = describe_model(model).native_windows
    est = torch.zeros(layers, kv_heads, len(options), dtype=torch.float64)
    device = next(model.parameters()).device
    with _recording(model, native) as rec:
        for ids, first, weight in _sequences(calib, ref):
            ids = ids.to(device)
            rec.layers.clear()
            logits = model(ids, use_cache=False, logits_to_keep=ids.shape[1] - first + 1).logits[0, :-1].float()
            loss = weight * F.cross_entropy(logits, ids[0, first:], reduction="sum")
            loss.backward()
            for li, lay in rec.layers.items():
                if native is not None and native[li] is not None:
                    continue
                est[li] += _layer_effects(lay, options, group).cpu()
            rec.layers.clear()
            if progress is not None:
                progress.update(1)
    return est.numpy()


@torch.no_grad()
def _layer_effects(lay: _Layer, options, group: int) -> torch.Tensor:
    """[kv_heads, options]: sum of g . (out_option - out_full) over positions and query heads."""
    g = lay.delta.grad
    B, Hq, S, D = lay.q.shape
    ranks = torch.arange(S, device=lay.q.device).expand(B, S)
    out = torch.zeros(Hq // group, len(options), dtype=torch.float64, device=lay.q.device)
    for j, (sink, window) in enumerate(options):
        first = min(S, sink + window)  # earlier queries see every key either way
        if first >= S:
            continue
        o = streaming_heads(lay.q[:, :, first:], lay.k, lay.v, ranks, ranks[:, first:], sink, window, lay.scale)
        effect = (g[:, :, first:] * (o - lay.out[:, :, first:])).double().sum(dim=(0, 2, 3))  # [Hq]
        out[:, j] = effect.view(-1, group).sum(-1)
    return out


@register_scorer("causal", kinds=NEEDLE_KINDS)
def causal_score(model, tasks, *, sink, window, progress=None):
    """First-order effect on the answers' log-probability of streaming each KV head alone (sink, window)."""
    calib = Calibration(tuple(tasks), (), 0)
    return estimate(model, calib, [(sink, window)], progress=progress)[:, :, 0]
