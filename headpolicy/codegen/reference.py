"""PyTorch references for the two custom ops, built on policies/rule.py (the semantics).

Dense and simple on purpose: these are what CPU runs and what the kernels are tested against.
"""

from __future__ import annotations

import torch

from headpolicy.policies.precision import Quantized, keys_per_channel
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
    full, groups = _plain_parts(k_full, v_full, full_rank, group_k, group_v, group_rank, group_sink, group_window)
    return _attend_parts(q, q_rank, full + groups, scale)


def _plain_parts(k_full, v_full, full_rank, group_k, group_v, group_rank, group_sink, group_window):
    """decode_attention's arguments as parts (k, v, rank, sink, window): ([retrieval part or none], groups)."""
    B, T = k_full.shape[0], k_full.shape[2]
    full = []
    if k_full.shape[1]:
        kr = full_rank.long() if full_rank is not None else torch.arange(T, device=k_full.device).expand(B, T)
        full.append((k_full, v_full, kr, None, None))
    rules = zip(group_k, group_v, group_rank, group_sink, group_window, strict=True)
    return full, [(k, v, r.long(), int(s), int(w)) for k, v, r, s, w in rules]


def _attend_parts(q, q_rank, parts, scale) -> torch.Tensor:
    """Dense masked attention of consecutive KV-head parts (k, v [B, H, N, D], rank [B, N], sink, window;
    sink None = retrieval), each part's query heads in order. Returns [B, Hq, 1, D]."""
    B, Hq = q.shape[:2]
    G = Hq // sum(p[0].shape[1] for p in parts)
    qr = q_rank.reshape(B, 1, 1, 1).long()
    outs, pos = [], 0
    for k, v, rank, sink, window in parts:
        hg = k.shape[1]
        mask = visible(qr, rank[:, None, None, :], sink, window)
        outs.append(masked_attention(q[:, pos * G : (pos + hg) * G], k, v, mask, scale))
        pos += hg
    return torch.cat(outs, dim=1)


QUANT_TENSORS = 10  # tensors per quantised part in decode_attention_quantized's `quant` list


def quantized_parts(quant, quant_retrieval, quant_bits, kv_group):
    """The `quant` list of decode_attention_quantized as (k, v Quantized, rank, k_tail, v_tail, tail_rank)
    per part (policies/precision.py layout: keys per channel for retrieval parts, per token otherwise)."""
    out = []
    for i, (retrieval, bits) in enumerate(zip(quant_retrieval, quant_bits, strict=True)):
        kc, ks, kz, vc, vs, vz, rank, k_tail, v_tail, tail_rank = quant[QUANT_TENSORS * i : QUANT_TENSORS * (i + 1)]
        k = Quantized(kc, ks, kz, int(bits), kv_group, keys_per_channel(bool(retrieval)))
        v = Quantized(vc, vs, vz, int(bits), kv_group, False)
        out.append((k, v, rank, k_tail, v_tail, tail_rank))
    return out


def decode_quantized_reference(
    q, q_rank, k_full, v_full, full_rank, group_k, group_v, group_rank, group_sink, group_window,
    quant, quant_retrieval, quant_bits, quant_sink, quant_window, kv_group, scale,
) -> torch.Tensor:  # fmt: skip
    """ops.decode_attention_quantized densely: every quantised part dequantised whole (to q.dtype),
    then masked attention per part. KV-head order: [k_full | quantised retrieval parts | groups |
    quantised streaming parts]. Returns [B, Hq, 1, D]."""
    deq = []
    for (k, v, rank, k_tail, v_tail, tail_rank), retrieval, s, w in zip(
        quantized_parts(quant, quant_retrieval, quant_bits, kv_group), quant_retrieval, quant_sink, quant_window,
        strict=True,
    ):  # fmt: skip
        k_all = torch.cat([k.dequantize(q.dtype), k_tail], dim=2)
        v_all = torch.cat([v.dequantize(q.dtype), v_tail], dim=2)
        rule = (None, None) if retrieval else (int(s), int(w))
        deq.append((k_all, v_all, torch.cat([rank, tail_rank], dim=1).long(), *rule))
    n_r = sum(1 for r in quant_retrieval if r)
    full, groups = _plain_parts(k_full, v_full, full_rank, group_k, group_v, group_rank, group_sink, group_window)
    return _attend_parts(q, q_rank, full + deq[:n_r] + groups + deq[n_r:], scale)
