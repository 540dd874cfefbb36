"""Headpolicy attention ops (PyTorch path) and the function registered with transformers.

After `apply`, each layer's KV heads are ordered [retrieval heads | streaming group 0 | ...].
Retrieval heads run ordinary causal attention over every cached token. Streaming heads
run *local* attention: each query sees the sink tokens plus its last `window` tokens, which
is computed chunk by chunk so prefill costs O(S * (sink + window)) instead of O(S^2).

All positions are ranks among real tokens (see reference.py); padding must be on the left.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from headpolicy.runtime.reference import reference_attention, token_ranks

ATTN_NAME = "headpolicy"
REFERENCE_ATTN_NAME = "headpolicy_reference"
CHUNK = 256  # streaming queries per block: keys per block stay ~ sink + window + CHUNK


def check_key_mask(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """The 2D padding mask [B, T] transformers hands to a custom attention function, or None."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"headpolicy attention expects a 2D padding mask of shape {(batch, length)}, "
            f"got {tuple(attention_mask.shape)}; 4D/custom masks are not supported"
        )
    return attention_mask.bool()


def retrieval_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_rank: torch.Tensor | None,
    q_rank: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Causal attention over all T keys for queries in the last S slots.

    q: [B, Hq, S, D]; k, v: [B, H, T, D] with Hq % H == 0; k_rank [B, T] / q_rank [B, S]
    are None when there is no padding. Returns [B, Hq, S, D].
    """
    S, T = q.shape[2], k.shape[2]
    if k_rank is None:
        if S == 1 or S == T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, scale=scale, enable_gqa=True)
        k_pos = torch.arange(T, device=q.device)
        mask = k_pos[None, :] <= (T - S + torch.arange(S, device=q.device))[:, None]  # [S, T]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    kr, qr = k_rank[:, None, None, :], q_rank[:, None, :, None]
    mask = (kr >= 0) & (kr <= qr)  # [B, 1, S, T]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.nan_to_num(0.0)  # padding queries see no key


def streaming_attention(
    q: torch.Tensor,
    q_rank: torch.Tensor,
    fixed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    local: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    sink: int,
    window: int,
    scale: float,
    chunk: int | None = None,
) -> torch.Tensor:
    """Sink + window attention, one block of `chunk` (default CHUNK) queries at a time.

    q: [B, Hq, S, D], q_rank: [B, S].
    fixed: segments (k [B, H, N, D], v, rank [B, N]) that every block sees whole: the sink
      tokens (ranks < sink) and, when decoding, the ring of recent tokens.
    local: (k [B, H, L, D], v, rank [B, L]) in slot order whose last S slots are the queries'
      own tokens; ranks < sink must be -1 there (those tokens live in a sink segment).
    Rank -1 marks empty/padding entries. Returns [B, Hq, S, D].
    """
    S = q.shape[2]
    chunk = chunk or CHUNK
    lk, lv, lr = local
    offset = lk.shape[2] - S
    fk = torch.cat([f[0] for f in fixed], dim=2) if fixed else lk[:, :, :0]
    fv = torch.cat([f[1] for f in fixed], dim=2) if fixed else lv[:, :, :0]
    fr = torch.cat([f[2] for f in fixed], dim=1) if fixed else lr[:, :0]
    outs = []
    for a in range(0, S, chunk):
        b = min(S, a + chunk)
        lo, hi = max(0, offset + a - window + 1), offset + b
        k = torch.cat([fk, lk[:, :, lo:hi]], dim=2)
        v = torch.cat([fv, lv[:, :, lo:hi]], dim=2)
        kr = torch.cat([fr, lr[:, lo:hi]], dim=1)[:, None, :]  # [B, 1, N]
        qr = q_rank[:, a:b, None]  # [B, s, 1]
        mask = (kr >= 0) & (kr <= qr) & ((kr < sink) | (qr - kr < window))
        outs.append(
            F.scaled_dot_product_attention(q[:, :, a:b], k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=True)
        )
    return torch.cat(outs, dim=2).nan_to_num(0.0)


def first_sink_tokens(rank: torch.Tensor, sink: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of the tokens with rank < sink, first n per row: (index [B, n], rank [B, n] or -1)."""
    big = rank.shape[1] + sink + 1
    key = torch.where((rank >= 0) & (rank < sink), rank, torch.full_like(rank, big))
    index = torch.argsort(key, dim=1, stable=True)[:, :n]
    picked = key.gather(1, index)
    return index, torch.where(picked < sink, picked, torch.full_like(picked, -1))


def gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D], index: [B, n] -> [B, H, n, D]."""
    B, H, _, D = x.shape
    return x.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], D))


def use_kernels(q: torch.Tensor) -> bool:
    """Generated Triton kernels on CUDA (codegen backend "auto"), or anywhere when forced to "triton".

    Otherwise the PyTorch ops below run: on CPU they beat the kernels' dense reference.
    """
    from headpolicy.codegen.ops import get_backend

    name = get_backend()
    return name == "triton" or (name == "auto" and q.is_cuda)


def prefill_kernel(plan, q, k, v, key_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The generated prefill kernel (torch.ops.headpolicy.prefill_attention) for one layer."""
    from headpolicy.codegen import ops  # noqa: F401  (registers torch.ops.headpolicy.*)

    retrieval, sink, window = plan_tables(plan)
    pad = None if key_mask is None else (~key_mask).sum(-1)
    return torch.ops.headpolicy.prefill_attention(
        q, k, v, pad, retrieval.tolist(), sink.tolist(), window.tolist(), scale
    )


def policy_attention_dense(module, q, k, v, key_mask, scale) -> torch.Tensor:
    """Headpolicy attention when K/V arrive as plain tensors holding every token (no split cache).

    q: [B, Hq, S, D]; k, v: [B, Hkv, T, D] in the permuted head order. Returns [B, Hq, S, D].
    """
    plan = module.headpolicy_plan
    B, _, S, _ = q.shape
    T = k.shape[2]
    key_mask = check_key_mask(key_mask, B, T)
    padded = key_mask is not None and not bool(key_mask.all())
    if use_kernels(q):
        return prefill_kernel(plan, q, k, v, key_mask if padded else None, scale)
    ranks = token_ranks(key_mask if padded else None, B, T, device=q.device)
    q_rank = ranks[:, T - S :]
    G, R = plan.group_size, plan.num_retrieval
    outs = []
    if R:
        kr, qr = (ranks, q_rank) if padded else (None, None)
        outs.append(retrieval_attention(q[:, : R * G], k[:, :R], v[:, :R], kr, qr, scale))
    for g in plan.groups:
        kg, vg = k[:, g.start : g.stop], v[:, g.start : g.stop]
        idx, sink_rank = first_sink_tokens(ranks, g.sink, min(T, g.sink))
        sink_seg = (gather_slots(kg, idx), gather_slots(vg, idx), sink_rank)
        local_rank = torch.where(ranks >= g.sink, ranks, torch.full_like(ranks, -1))
        qg = q[:, g.start * G : g.stop * G]
        outs.append(streaming_attention(qg, q_rank, [sink_seg], (kg, vg, local_rank), g.sink, g.window, scale))
    return torch.cat(outs, dim=1)


def headpolicy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls for every attention layer once a policy is applied.

    query: [B, Hq, S, D]; key/value: plain [B, Hkv, T, D] tensors, or the SplitKVView that
    SplitKVCache.update returned. Returns ([B, S, Hq, D], None) like transformers' own.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if hasattr(key, "attend"):  # a SplitKVView: the split cache attends and commits the new tokens
        out = key.attend(query, attention_mask, scale)
    else:
        out = policy_attention_dense(module, query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None


def plan_tables(plan, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-KV-head (retrieval, sink, window) tensors [Hkv] of a LayerPlan, in permuted order."""
    H = plan.num_kv_heads
    retrieval = torch.zeros(H, dtype=torch.bool, device=device)
    retrieval[: plan.num_retrieval] = True
    sink = torch.zeros(H, dtype=torch.long, device=device)
    window = torch.ones(H, dtype=torch.long, device=device)
    for g in plan.groups:
        sink[g.start : g.stop], window[g.start : g.stop] = g.sink, g.window
    return retrieval, sink, window


def headpolicy_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense masked reference (reference.py) behind the same interface; needs K/V holding every token."""
    if hasattr(key, "attend"):
        raise ValueError("the reference attention needs full K/V: use a DynamicCache, not a SplitKVCache")
    B, T = key.shape[0], key.shape[2]
    retrieval, sink, window = plan_tables(module.headpolicy_plan, query.device)
    out = reference_attention(
        query,
        key,
        value,
        retrieval=retrieval,
        sink=sink,
        window=window,
        key_valid=check_key_mask(attention_mask, B, T),
        scale=scaling,
    )
    return out.transpose(1, 2).contiguous(), None


def padding_mask(*, batch_size, kv_length, kv_offset=0, attention_mask=None, **kwargs) -> torch.Tensor | None:
    """Mask builder for transformers: hand the attention function the 2D padding mask [B, kv_length].

    Causality and the sink/window rule are applied inside the attention ops, from token ranks;
    a 4D [B, 1, S, T] mask would cost O(S*T) memory for nothing.
    """
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset : kv_offset + kv_length].bool()
    if mask.shape != (batch_size, kv_length):
        raise ValueError(f"padding mask of shape {tuple(attention_mask.shape)} does not cover {kv_length} keys")
    return mask


for _name, _fn in ((ATTN_NAME, headpolicy_attention), (REFERENCE_ATTN_NAME, headpolicy_reference_attention)):
    AttentionInterface.register(_name, _fn)
    AttentionMaskInterface.register(_name, padding_mask)
