"""The sink/window rule: which keys a head may attend, written once.

Every fast path (the split cache and its attention, the Triton kernels, the exported graph
ops, ONNX) and every scorer uses these functions or is tested against `reference_attention`.

Positions are *ranks*: the index of a token among the real (non-padding) tokens of its own
sequence, -1 for padding or for an empty cache slot. With left padding, rank = slot -
pad_count, so a padded sequence is treated exactly like the same sequence without padding.

For a KV head h, query rank i may attend key rank j iff

    j >= 0  and  i >= 0  and  j <= i                      (real, causal)
    and ( retrieval[h]  or  j < sink[h]  or  i - j < window[h] )

so a streaming head sees the first `sink` tokens plus the last `window` tokens (itself
included) and a retrieval head sees everything. A streaming head therefore keeps
min(T, sink + window) tokens; where it keeps them is `ring_slot`.

The compensation token (RazorAttention), for streaming heads whose policy asks for it: query
rank i also attends one extra key/value standing for the keys it dropped,

    D_i = { j real : sink <= j <= i - window }         (exactly what the rule above drops)
    k_c = mean of K over D_i,  v_c = mean of V over D_i,  logit  scale * q . k_c + log |D_i|

so the slot weighs like |D_i| tokens of the average dropped key. It is absent while D_i is
empty (i < sink + window). |D_i| depends on the rank alone (`dropped_count`); a cache keeps
only the running sums of K and V over the tokens it evicted.
"""

from __future__ import annotations

import math

import torch


# ---- ranks -----------------------------------------------------------------------------------
def token_ranks(key_valid: torch.Tensor | None, batch: int, length: int, device=None) -> torch.Tensor:
    """Ranks of each slot among the real tokens of its row; -1 for padding.

    key_valid: [B, T] (bool or 0/1) or None (no padding). Returns int64 [B, T].
    """
    if key_valid is None:
        return torch.arange(length, device=device).expand(batch, length)
    valid = key_valid.to(torch.bool)
    ranks = valid.long().cumsum(-1) - 1
    return torch.where(valid, ranks, torch.full_like(ranks, -1))


# ---- mask pieces: tiny functions over broadcastable rank tensors, combined with & and | ---------
def real(q_rank: torch.Tensor, k_rank: torch.Tensor) -> torch.Tensor:
    return (q_rank >= 0) & (k_rank >= 0)


def causal(q_rank: torch.Tensor, k_rank: torch.Tensor) -> torch.Tensor:
    return k_rank <= q_rank


def sink_or_window(sink, window):
    """The streaming rule; `sink`/`window` are ints or tensors broadcasting against the ranks."""

    def mask(q_rank: torch.Tensor, k_rank: torch.Tensor) -> torch.Tensor:
        return (k_rank < sink) | (q_rank - k_rank < window)

    mask.__name__ = "sink_or_window"
    return mask


def visible(q_rank: torch.Tensor, k_rank: torch.Tensor, sink=None, window=None) -> torch.Tensor:
    """Keys a query may attend: real, causal and, for a streaming head (sink/window given), in
    its sink or window. Ranks broadcast against each other; sink=None means a retrieval head."""
    mask = real(q_rank, k_rank) & causal(q_rank, k_rank)
    if sink is not None:
        mask = mask & sink_or_window(sink, window)(q_rank, k_rank)
    return mask


def dropped(q_rank: torch.Tensor, k_rank: torch.Tensor, sink, window) -> torch.Tensor:
    """Keys a full head attends but a streaming head with this sink/window does not."""
    return visible(q_rank, k_rank) & ~sink_or_window(sink, window)(q_rank, k_rank)


def dropped_count(q_rank, sink, window):
    """|D_i|: how many keys a streaming query of rank `q_rank` has dropped (0 for padding, -1).
    Works on ints and on tensors broadcasting against sink/window."""
    if isinstance(q_rank, int):
        return max(0, q_rank - window - sink + 1) if q_rank >= 0 else 0
    return (q_rank - window - sink + 1).clamp(min=0) * (q_rank >= 0)


def compensation_logit_bias(count: torch.Tensor) -> torch.Tensor:
    """log |D_i| added to the compensation token's logit; -inf where nothing was dropped (no token)."""
    count = count.float()
    return torch.where(count > 0, count.clamp(min=1).log(), torch.full_like(count, float("-inf")))


def headpolicy_mask(
    q_rank: torch.Tensor,
    k_rank: torch.Tensor,
    retrieval: torch.Tensor,
    sink: torch.Tensor,
    window: torch.Tensor,
) -> torch.Tensor:
    """Boolean mask [B, Hkv, S, T] of the rule for a per-KV-head table.

    q_rank: [B, S], k_rank: [B, T], retrieval/sink/window: [Hkv] (bool / int).
    """
    qr = q_rank[:, None, :, None]
    kr = k_rank[:, None, None, :]
    per_head = lambda x: x.to(qr.device)[None, :, None, None]
    keep_all = per_head(retrieval.bool())
    local = sink_or_window(per_head(sink), per_head(window))(qr, kr)
    return visible(qr, kr) & (keep_all | local)


# ---- storage: how many tokens a streaming head keeps, and where ---------------------------------
def kept_tokens(context: int, sink: int, window: int) -> int:
    """Tokens a streaming head holds after `context` tokens."""
    return min(context, sink + window)


def kept(rank: torch.Tensor, last, sink: int, window: int) -> torch.Tensor:
    """Which tokens (ranks, broadcasting against `last`) a streaming head still holds once the
    token of rank `last` is stored: the sink and the last `window` (what `ring_slot` keeps)."""
    return (rank < sink) | (rank > last - window)


def causal_below(sink: int, window: int) -> int:
    """Queries of rank < sink + window see every earlier key: for them the streaming rule is causal
    (their window reaches back to the sink), so plain causal attention computes it exactly."""
    return sink + window


def ring_slot(rank, sink: int, window: int):
    """Buffer slot of the token of rank `rank` (int or tensor): the first `sink` tokens in order,
    then a ring of `window` slots, so right after token r is stored the buffer holds exactly
    the keys r may attend."""
    if isinstance(rank, int):
        return rank if rank < sink else sink + (rank - sink) % window
    return torch.where(rank < sink, rank, sink + torch.remainder(rank - sink, window))


# ---- the dense reference ---------------------------------------------------------------------------
def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
    extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Dense softmax attention with an explicit boolean mask; fully masked rows give zeros.

    q: [B, Hq, S, D]; k, v: [B, Hkv, T, D]; mask: [B, Hkv or 1, S, T] bool.
    extra: one more key/value per query, (k_e, v_e [B, Hkv, S, D], bias [B, Hkv, S]) whose logit
    is scale * q . k_e + bias (-inf: no extra key), e.g. the compensation token.
    Query head h uses KV head h // (Hq // Hkv). Computes in float32, returns q.dtype.
    """
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    qf = q.float().view(B, Hkv, group, S, D)
    scores = torch.einsum("bhgsd,bhtd->bhgst", qf, k.float()) * scale  # [B, Hkv, G, S, T]
    m = mask[:, :, None]
    scores = scores.masked_fill(~m, float("-inf"))
    if extra is not None:
        ke, ve, bias = extra
        own = torch.einsum("bhgsd,bhsd->bhgs", qf, ke.float()) * scale + bias.float()[:, :, None]
        scores = torch.cat([scores, own[..., None]], dim=-1)  # [B, Hkv, G, S, T + 1]
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key -> 0
    out = torch.einsum("bhgst,bhtd->bhgsd", probs[..., : k.shape[2]], v.float())
    if extra is not None:
        out = out + probs[..., -1:] * ve.float()[:, :, None]
    return out.reshape(B, Hq, S, D).to(q.dtype)


def compensation(
    k: torch.Tensor, v: torch.Tensor, drop: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each query's compensation token, densely: the mean key and value over its dropped keys.

    k, v: [B, H, T, D]; drop: [B, H, S, T] bool (D_i of each query). Returns (k_c, v_c
    [B, H, S, D] float32, zeros where nothing was dropped; bias [B, H, S] = log |D_i| or -inf).
    """
    w = drop.float()
    count = w.sum(-1)  # [B, H, S]
    mean = lambda x: torch.einsum("bhst,bhtd->bhsd", w, x.float()) / count.clamp(min=1)[..., None]
    return mean(k), mean(v), compensation_logit_bias(count)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    retrieval: torch.Tensor,
    sink: torch.Tensor,
    window: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    compensate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Headpolicy attention for queries that are the last S of T slots.

    q: [B, Hq, S, D]; k, v: [B, Hkv, T, D]; key_valid: [B, T] or None;
    retrieval: [Hkv] bool; sink, window: [Hkv] int; compensate: [Hkv] bool or None (no head
    keeps a compensation token; retrieval heads never do). Returns [B, Hq, S, D].
    """
    B, _, S, _ = q.shape
    T = k.shape[2]
    k_rank = token_ranks(key_valid, B, T, device=q.device)
    q_rank = k_rank[:, T - S :]
    mask = headpolicy_mask(q_rank, k_rank, retrieval, sink, window)
    extra = None
    if compensate is not None and bool((compensate.bool() & ~retrieval.bool()).any()):
        heads = (compensate.bool() & ~retrieval.bool()).to(q.device)[None, :, None, None]
        full = visible(q_rank[:, None, :, None], k_rank[:, None, None, :])  # [B, 1, S, T]
        extra = compensation(k, v, full & ~mask & heads)  # D_i: what the streaming rule took away
    return masked_attention(q, k, v, mask, scale, extra)
