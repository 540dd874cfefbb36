"""PyTorch references for the two custom ops, built on policies/rule.py (the semantics).

Dense and simple on purpose: these are what CPU runs and what the kernels are tested against.
"""

from __future__ import annotations

import torch

from headpolicy.policies.rule import masked_attention, reference_attention, visible


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


def decode_reference(
    q, q_rank, k_full, v_full, full_rank, group_k, group_v, group_rank, group_sink, group_window, scale
) -> torch.Tensor:
    """One query per row over the split cache (see ops.decode_attention). Returns [B, Hq, 1, D]."""
    B, Hq, _, D = q.shape
    R = k_full.shape[1]
    kv_heads = R + sum(t.shape[1] for t in group_k)
    G = Hq // kv_heads
    qr = q_rank.reshape(B, 1, 1, 1).long()
    outs = []
    if R:
        T = k_full.shape[2]
        kr = full_rank.long() if full_rank is not None else torch.arange(T, device=q.device).expand(B, T)
        outs.append(masked_attention(q[:, : R * G], k_full, v_full, visible(qr, kr[:, None, None, :]), scale))
    pos = R
    for k, v, rank, s, w in zip(group_k, group_v, group_rank, group_sink, group_window, strict=True):
        hg = k.shape[1]
        mask = visible(qr, rank.long()[:, None, None, :], int(s), int(w))
        outs.append(masked_attention(q[:, pos * G : (pos + hg) * G], k, v, mask, scale))
        pos += hg
    return torch.cat(outs, dim=1)
