"""PyTorch references for the two custom ops, built on runtime/reference.py (the semantics).

Dense and simple on purpose: these are what CPU runs and what the kernels are tested against.
"""

from __future__ import annotations

import torch

from headpolicy.runtime.reference import masked_attention, reference_attention


def pad_to_key_valid(pad: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor | None:
    """Left-padding counts [B] -> key_valid [B, T] (None stays None)."""
    if pad is None:
        return None
    slots = torch.arange(length, device=device)
    return slots[None, :] >= pad.to(device).long()[:, None]


def prefill_reference(q, k, v, pad, retrieval, sink, window, scale) -> torch.Tensor:
    """q: [B, Hq, S, D] (last S of T slots); k, v: [B, Hkv, T, D]; pad: [B] or None; table: [Hkv]."""
    B, T = k.shape[0], k.shape[2]
    dev = q.device
    return reference_attention(
        q,
        k,
        v,
        retrieval=torch.as_tensor(list(retrieval), dtype=torch.bool, device=dev),
        sink=torch.as_tensor(list(sink), dtype=torch.long, device=dev),
        window=torch.as_tensor(list(window), dtype=torch.long, device=dev),
        key_valid=pad_to_key_valid(pad, B, T, dev),
        scale=scale,
    )


def _rank_rule(q_rank, k_rank, retrieval: bool, sink: int, window: int) -> torch.Tensor:
    """Mask [B, 1, 1, N] of the headpolicy rule for one query per row: q_rank [B], k_rank [B, N]."""
    qr, kr = q_rank[:, None], k_rank
    m = (kr >= 0) & (qr >= 0) & (kr <= qr)
    if not retrieval:
        m = m & ((kr < sink) | (qr - kr < window))
    return m[:, None, None, :]


def decode_reference(
    q, q_rank, k_full, v_full, full_rank, sink_k, sink_v, sink_rank, ring_k, ring_v, ring_rank,
    group_sink, group_window, scale,
) -> torch.Tensor:  # fmt: skip
    """One query per row over the split cache (see ops.decode_attention). Returns [B, Hq, 1, D]."""
    B, Hq, _, D = q.shape
    R = k_full.shape[1]
    kv_heads = R + sum(t.shape[1] for t in sink_k)
    G = Hq // kv_heads
    q_rank = q_rank.reshape(B).long()
    outs = []
    if R:
        T = k_full.shape[2]
        kr = full_rank.long() if full_rank is not None else torch.arange(T, device=q.device).expand(B, T)
        outs.append(masked_attention(q[:, : R * G], k_full, v_full, _rank_rule(q_rank, kr, True, 0, 1), scale))
    pos = R
    for i, (s, w) in enumerate(zip(group_sink, group_window, strict=True)):
        hg = sink_k[i].shape[1]
        k = torch.cat([sink_k[i], ring_k[i]], dim=2)
        v = torch.cat([sink_v[i], ring_v[i]], dim=2)
        kr = torch.cat([sink_rank[i], ring_rank[i]], dim=1).long()
        qg = q[:, pos * G : (pos + hg) * G]
        outs.append(masked_attention(qg, k, v, _rank_rule(q_rank, kr, False, int(s), int(w)), scale))
        pos += hg
    return torch.cat(outs, dim=1)
