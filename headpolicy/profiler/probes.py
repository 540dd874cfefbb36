"""Probes: attention capture without S x S maps: reduce what a scorer needs, layer by layer, on the fly.

`capturing(model, probe)` switches the model to the `headpolicy_capture` attention function
(registered with transformers' AttentionInterface). That function computes the layer's
ordinary causal attention with SDPA and, besides, the softmax rows of only the query
positions the probe asks for, `chunk` rows at a time; the probe reduces each chunk to a few
numbers at once. Peak extra memory is [Hq, chunk, T] floats for one layer, never [L, Hq, T, T].

Capture runs unpadded sequences (batch rows of equal length, no padding), no KV cache.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from headpolicy.models import get_adapter
from headpolicy.runtime.attention import model_attention, padding_mask
from headpolicy.runtime.state import applied

CAPTURE_NAME = "headpolicy_capture"
CHUNK = 128  # query rows per probability block

_ACTIVE: list = []  # (probe, the model's own sliding windows) of the innermost `capturing` block


class Probe:
    """What to take from each layer's attention. Subclass and override `rows` and `consume`."""

    def rows(self, layer: int, seq_len: int) -> torch.Tensor | None:
        """Query positions (int64 [n], ascending) whose attention rows `consume` wants; None = none."""
        return None

    def consume(self, layer: int, rows: torch.Tensor, probs: torch.Tensor) -> None:
        """probs: float32 [B, Hq, n, T] softmax rows of query positions `rows` [n] over all T keys."""


def attention_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax rows for query positions `rows` of a full (S == T) self-attention.

    q: [B, Hq, S, D]; k: [B, Hkv, T, D]; rows: [n]. Returns float32 [B, Hq, n, T].
    """
    B, Hq, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qs = q[:, :, rows].float().view(B, Hkv, G, len(rows), D)
    scores = torch.einsum("bhgnd,bhtd->bhgnt", qs, k.float()) * scale  # [B, Hkv, G, n, T]
    q_pos = rows + (T - S)
    future = torch.arange(T, device=q.device)[None, :] > q_pos[:, None]  # [n, T]
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1).reshape(B, Hq, len(rows), T)


def capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal SDPA attention, plus the probe's rows. query: [B, Hq, S, D]; key/value: [B, Hkv, T, D]."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    S, T = query.shape[2], key.shape[2]
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("attention capture runs unpadded sequences only")
    if S != T:
        raise ValueError("attention capture runs whole sequences without a KV cache (use_cache=False)")
    probe, windows = _ACTIVE[-1] if _ACTIVE else (None, None)
    layer = getattr(module, "layer_idx", None)
    window = None if windows is None or layer is None else windows[layer]
    out = model_attention(query, key, value, scale, window)  # a hybrid model's sliding layers slide
    if probe is not None and layer is not None:
        rows = probe.rows(layer, S)
        if rows is not None and len(rows):
            rows = rows.to(query.device)
            for a in range(0, len(rows), CHUNK):
                part = rows[a : a + CHUNK]
                probe.consume(layer, part, attention_rows(query, key, part, scale))
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(CAPTURE_NAME, capture_attention)
AttentionMaskInterface.register(CAPTURE_NAME, padding_mask)


@contextlib.contextmanager
def capturing(model, probe: Probe):
    """Run `model` inside the block with attention capture feeding `probe`."""
    if applied(model) is not None:
        raise ValueError("profile the unmodified model: this one already has a headpolicy applied")
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_NAME)
    _ACTIVE.append((probe, get_adapter(model).native_windows(model)))
    try:
        yield probe
    finally:
        _ACTIVE.pop()
        model.set_attn_implementation(previous)


def kv_group(model) -> tuple[int, int, int]:
    """(num_layers, num_attention_heads, num_kv_heads) of a model, via its adapter."""
    layers, heads, kv_heads, _ = get_adapter(model).head_counts(model)
    return layers, heads, kv_heads


def reduce_to_kv(per_query_head: torch.Tensor, num_kv_heads: int, how: str = "max") -> torch.Tensor:
    """[L, Hq] -> [L, Hkv]. Query head h belongs to KV head h // (Hq // Hkv).

    "max": a KV head must keep its cache if any query head reading it needs the far context.
    """
    L, Hq = per_query_head.shape
    grouped = per_query_head.reshape(L, num_kv_heads, Hq // num_kv_heads)
    if how == "max":
        return grouped.amax(dim=-1)
    if how == "mean":
        return grouped.mean(dim=-1)
    raise ValueError(f"unknown reduction {how!r} (max, mean)")
