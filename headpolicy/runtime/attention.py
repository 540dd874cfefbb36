"""All headpolicy attention maths: prefill and decode, PyTorch ops and the generated kernels.

After `apply`, each layer's KV heads are ordered [retrieval heads | streaming group 0 | ...]
(policies/plan.py). Retrieval heads run ordinary causal attention over every cached token.
Streaming heads run *local* attention under the sink/window rule (policies/rule.py): each
query sees the sink tokens plus its last `window` tokens. Positions are ranks among the real
tokens of a row (rule.token_ranks); padding must be on the left.

Entry points, one per phase:
    prefill(plan, q, ...)   S >= 1 new tokens attend the cached ones and each other
    decode(plan, q, layer)  one new token per row, already committed to the split cache
`headpolicy_attention` is the function transformers calls (registered below): it routes a
layer's call to them, and commits the streaming tokens to the cache (runtime/cache.py) at
the right moment. `_kernel` is the one place that hands work to the generated Triton kernels.

Prefill paths on CPU (each is exact; tests/runtime/test_attention.py holds them to
rule.reference_attention), chosen per layer and call:
    1. a fresh sequence no longer than every group's sink + window (plan.causal_below): the rule
       is causal for every head, so the whole layer is one causal SDPA call;
    2. a fresh sequence without padding: retrieval heads one causal SDPA call; each streaming
       group causal SDPA for the queries below sink + window, then `band_attention`: all later
       queries in blocks of `query_block(window)`, every block one batch item of a single SDPA
       call over [sink | its band of window - 1 + block keys], with one mask shared by every
       block (built once per shape, `band_table`);
    3. a fresh left-padded batch: each row's real tokens alone through 1./2. (no mask at all);
    4. new tokens on top of a cache (chunked prefill), or ranks given explicitly: the same
       blocks, with masks from ranks (`local_blocks`).
Streaming groups with a compensation token (policies/rule.py: one extra key per query, the mean
of what it dropped, logit + log|D_i|) always take path 4's rank masks: `compensation_tokens`
builds each query's token from prefix sums over the dropped tokens (plus the cache's sums of
what it evicted), and `local_blocks` attends it as one extra key per query in the same SDPA
call (an additive mask carries log|D_i|), so the softmax over keys and token is exact. Decode
appends the group's token to its buffer. Path 1 stays exact: there nothing is dropped yet.
Measured on SmolLM2-135M shapes (1 thread, sink 64 + window 256, 6 query heads): path 2 takes
13/23/44/88 ms at 1K/2K/4K/8K tokens where causal SDPA over the same heads takes 16/48/174/663
and the earlier loop of 256-query chunks 14/27/55/114; compiled FlexAttention with a block mask
took 30/63 ms at 2K/4K after a 21 s first compile, so it is not used on CPU.

Quantised heads (kv_bits 8/4, policies/precision.py; stored by runtime/quant_cache.py): a
query attends the tokens of its own call at full precision and everything cached before it
as stored: each call dequantises a quantised part once into one transient buffer and runs SDPA
over it (section "quantised heads" at the end). A decode step stores its token first, so it
attends that token as stored too; on the CPU, with no padding, it reads the codes directly
through the C kernel of codegen/cpu.py instead (no buffer; falls back here without a
compiler). A layer whose every head is quantised does all of a decode step's C work in one
call per bit width (`CStep`: ring writes and every part's attention) rather than a few calls
per part. A layer may mix quantised and compensated heads, but a group is never both
(plan.StreamGroup refuses it), so the compensated paths only ever read full-precision buffers.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import headpolicy.codegen.ops  # noqa: F401  (registers torch.ops.headpolicy.prefill/decode_attention)
from headpolicy.codegen.cpu import LayerStep, StepPart, decode_prepared
from headpolicy.codegen.ops import use_cpu_kernel, use_kernels
from headpolicy.errors import UnsupportedPolicyError
from headpolicy.policies.plan import LayerPlan, StreamGroup
from headpolicy.policies.rule import (
    causal_below,
    compensation_logit_bias,
    dropped_count,
    reference_attention,
    token_ranks,
    visible,
)
from headpolicy.runtime.buffers import StreamBuffer
from headpolicy.runtime.cache import SplitKVLayer, SplitKVStep
from headpolicy.runtime.quant_cache import QuantRetrievalPart, QuantStreamBuffer, QuantTokenBuffer
from headpolicy.runtime.state import layer_plan

ATTN_NAME = "headpolicy"
REFERENCE_ATTN_NAME = "headpolicy_reference"
BLOCK_MIN, BLOCK_MAX = 32, 256

Segment = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # k [B, H, N, D], v, rank [B, N] (-1 = empty)
Extra = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # compensation tokens k, v [B, H, S, D], log|D_i| [B, S]


def query_block(window: int) -> int:
    """Streaming queries per block. A block reads sink + window - 1 + block keys for `block`
    queries that each need sink + window of them: small blocks waste less, large ones copy fewer
    key bands. window / 4 was fastest on CPU (64 for window 256: 13-20% faster than 128-256)."""
    return max(BLOCK_MIN, min(BLOCK_MAX, window // 4))


# ---- building blocks -----------------------------------------------------------------------------
def check_key_mask(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """The 2D padding mask [B, T] transformers hands a custom attention function; None when no row is padded."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"headpolicy attention expects a 2D padding mask of shape {(batch, length)}, "
            f"got {tuple(attention_mask.shape)}; 4D/custom masks are not supported"
        )
    mask = attention_mask.bool()
    return None if bool(mask.all()) else mask


def left_padding(k_rank: torch.Tensor) -> list[int] | None:
    """Padding slots per row when every row's padding is on the left (k_rank [B, T]), else None."""
    T = k_rank.shape[1]
    pad = (k_rank < 0).sum(-1, keepdim=True)  # [B, 1]
    slots = torch.arange(T, device=k_rank.device)
    expected = torch.where(slots >= pad, slots - pad, torch.full_like(k_rank, -1))
    return pad[:, 0].tolist() if torch.equal(k_rank, expected) else None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention, no padding, queries in the last S of the T slots.

    q: [B, Hq, S, D]; k, v: [B, H, T, D] with Hq % H == 0. Returns [B, Hq, S, D].
    """
    S, T = q.shape[2], k.shape[2]
    if S == 1 or S == T:  # SDPA's is_causal aligns queries to the first keys: right only when S == T
        return F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, scale=scale, enable_gqa=True)
    slots = torch.arange(T, device=q.device)
    mask = visible(slots[T - S :, None], slots[None, :])  # [S, T]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def retrieval_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_rank: torch.Tensor | None,
    q_rank: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Causal attention over all T keys for queries in the last S slots.

    q: [B, Hq, S, D]; k, v: [B, H, T, D] with Hq % H == 0; k_rank [B, T] is None when no row
    is padded (then q_rank [B, S] is not read). Returns [B, Hq, S, D].
    """
    if k_rank is None:
        return causal_attention(q, k, v, scale)
    mask = visible(q_rank[:, None, :, None], k_rank[:, None, None, :])  # [B, 1, S, T]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.nan_to_num(0.0)  # padding queries see no key


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


# ---- local attention in blocks: every block of queries is one batch item of one SDPA call --------
def _query_blocks(q: torch.Tensor, block: int) -> torch.Tensor:
    """q: [B, Hq, S, D] -> [B * nb, Hq, block, D], the last block padded with zero queries."""
    B, Hq, S, D = q.shape
    nb = -(-S // block)
    rows = F.pad(q.transpose(1, 2), (0, 0, 0, 0, 0, nb * block - S))  # [B, nb * block, Hq, D]
    return rows.reshape(B * nb, block, Hq, D).transpose(1, 2)


def _unblock(out: torch.Tensor, batch: int, S: int) -> torch.Tensor:
    """[B * nb, Hq, block, D] -> [B, Hq, S, D] (the padding queries dropped)."""
    _, Hq, block, D = out.shape
    nb = out.shape[0] // batch
    return out.view(batch, nb, Hq, block, D).transpose(1, 2).reshape(batch, Hq, nb * block, D)[:, :, :S]


@functools.lru_cache(maxsize=64)
def band_table(T: int, first: int, sink: int, window: int, block: int, device: torch.device):
    """Keys of each block of `band_attention` and the mask every block shares.

    Queries first .. T-1 (all >= sink + window) in blocks of `block`; the block starting at
    query a reads the sink [0, sink) then the band a - window + 1 .. a + block - 1 (clamped to
    T - 1: only padding queries of the last block reach past it). Returns (slots [nb * L]
    int64, mask [block, L] bool) with L = sink + window - 1 + block. Built once per shape.
    """
    nb = -(-(T - first) // block)
    starts = first + block * torch.arange(nb, device=device)
    band = (starts[:, None] - window + 1) + torch.arange(window - 1 + block, device=device)  # [nb, W - 1 + C]
    sinks = torch.arange(sink, device=device).expand(nb, sink)
    slots = torch.cat([sinks, band.clamp(max=T - 1)], dim=1).reshape(-1)
    # The rule on the first block's ranks: it only depends on how far apart a query and a key are,
    # and the sink never overlaps a band (a - window + 1 > sink), so every block shares this mask.
    q_rank = first + torch.arange(block, device=device)
    k_rank = torch.cat([torch.arange(sink, device=device), band[0]])
    return slots, visible(q_rank[:, None], k_rank[None, :], sink, window)


def band_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int, scale: float
) -> torch.Tensor:
    """Sink + window attention for queries of rank >= sink + window, no padding, no cache.

    q: [B, Hq, n, D], the last n of the T slots of k, v [B, H, T, D]. Returns [B, Hq, n, D].
    """
    B, Hq, n, D = q.shape
    H, T = k.shape[1], k.shape[2]
    block = query_block(window)
    slots, mask = band_table(T, T - n, sink, window, block, k.device)
    L = mask.shape[1]

    def blocks(x):  # [B, H, T, D] -> [B * nb, H, L, D]: gathered in slot-major order, so one copy
        return x.transpose(1, 2).index_select(1, slots).view(-1, L, H, D).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        _query_blocks(q, block), blocks(k), blocks(v), attn_mask=mask, scale=scale, enable_gqa=True
    )
    return _unblock(out, B, n)


def streaming_band(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int, scale: float):
    """One streaming group without padding or cache: queries are the last S of the T slots.

    q: [B, Hq, S, D]; k, v: [B, H, T, D]. Queries of rank < sink + window see every earlier key
    (causal attention); the rest go through `band_attention`. Returns [B, Hq, S, D].
    """
    S, T = q.shape[2], k.shape[2]
    n_causal = min(S, max(0, causal_below(sink, window) - (T - S)))
    if n_causal == S:
        return causal_attention(q, k, v, scale)
    tail = band_attention(q[:, :, n_causal:], k, v, sink, window, scale)
    if n_causal == 0:
        return tail
    stop = T - S + n_causal
    head = causal_attention(q[:, :, :n_causal], k[:, :, :stop], v[:, :, :stop], scale)
    return torch.cat([head, tail], dim=2)


def local_blocks(
    q: torch.Tensor,
    q_rank: torch.Tensor,
    fixed: Segment,
    local: Segment,
    sink: int,
    window: int,
    scale: float,
    extra: Extra | None = None,
) -> torch.Tensor:
    """Sink + window attention from ranks, in blocks of `query_block(window)` queries.

    fixed: keys every block sees whole (the sink tokens, a cached buffer) [B, H, F, D] with ranks
    [B, F]; local: the new tokens [B, H, L, D] in slot order, whose last S are the queries' own,
    with ranks [B, L] (-1 where the token is in `fixed`). q: [B, Hq, S, D], q_rank [B, S].
    extra: each query's compensation token (`compensation_tokens`), appended to its block's keys
    and visible to that query alone, with logit + log|D_i|.
    Returns [B, Hq, S, D]; rows with no visible key (padding queries) are zeros.
    """
    B, Hq, S, D = q.shape
    fk, fv, fr = fixed
    lk, lv, lr = local
    H, L, F_ = lk.shape[1], lk.shape[2], fk.shape[2]
    block = query_block(window)
    nb = -(-S // block)
    # the block of queries at local slot a reads the band a - window + 1 .. a + block - 1
    starts = (L - S) + block * torch.arange(nb, device=q.device)
    band = (starts[:, None] - window + 1) + torch.arange(window - 1 + block, device=q.device)  # [nb, Wb]
    inside = (band >= 0) & (band < L)
    band = band.clamp(0, L - 1)
    Wb = band.shape[1]

    def blocks(f, x):  # fixed [B, H, F, D] + local [B, H, L, D] -> [B * nb, H, F + Wb, D]
        xb = x.transpose(1, 2).index_select(1, band.reshape(-1)).view(B, nb, Wb, H, D)
        fb = f.transpose(1, 2)[:, None].expand(B, nb, F_, H, D)
        return torch.cat([fb, xb], dim=2).view(B * nb, F_ + Wb, H, D).transpose(1, 2)

    band_rank = torch.where(inside, lr[:, band], torch.full_like(lr[:, band], -1))  # [B, nb, Wb]
    k_rank = torch.cat([fr[:, None].expand(B, nb, F_), band_rank], dim=2)  # [B, nb, F + Wb]
    qr = F.pad(q_rank, (0, nb * block - S), value=-1).view(B, nb, block)
    mask = visible(qr[..., :, None], k_rank[..., None, :], sink, window)  # [B, nb, block, F + Wb]
    keys, values = blocks(fk, lk), blocks(fv, lv)
    if extra is not None:  # block keys + one token per query: [B * nb, H, F + Wb + block, D]
        ek, ev, bias = extra
        keys = torch.cat([keys, _query_blocks(ek.to(keys.dtype), block)], dim=2)
        values = torch.cat([values, _query_blocks(ev.to(values.dtype), block)], dim=2)
        none = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
        own = F.pad(bias, (0, nb * block - S), value=float("-inf")).view(B, nb, block).to(q.dtype)
        eye = torch.eye(block, dtype=torch.bool, device=q.device)
        mask = torch.cat([torch.where(mask, 0.0, none), torch.where(eye, own[..., None], none)], dim=-1)
    out = F.scaled_dot_product_attention(
        _query_blocks(q, block), keys, values, attn_mask=mask.view(B * nb, 1, block, -1), scale=scale,
        enable_gqa=True,
    )  # fmt: skip
    return _unblock(out, B, S).nan_to_num(0.0)


def compensation_tokens(
    k: torch.Tensor,
    v: torch.Tensor,
    k_rank: torch.Tensor,
    q_rank: torch.Tensor,
    sink: int,
    window: int,
    past: Segment | None = None,
    sums: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Extra:
    """Each query's compensation token (policies/rule.py) for one streaming group.

    k, v: the new tokens [B, H, L, D] with ranks k_rank [B, L] (-1 = padding); q_rank [B, S].
    past: the group's buffer before them (k, v, rank) and sums: its sums of evicted keys/values
    [B, H, D] (ranks sink .. base - 1, base = max(sink, last buffered rank - window + 1)), or None.
    The tokens of rank >= base (buffered and new) are laid out by rank and summed by a prefix sum;
    query rank i takes the prefix up to i - window plus the sums. Returns (k_c, v_c [B, H, S, D]
    float32, log|D_i| [B, S], -inf where nothing was dropped).
    """
    B, H, _, D = k.shape
    acc = torch.promote_types(k.dtype, torch.float32)
    prev_last = past[2].max(dim=1).values if past is not None and past[2].shape[1] else k_rank.new_full((B,), -1)
    base = (prev_last - window + 1).clamp(min=sink)[:, None]  # [B, 1]
    width = int((k_rank.max(dim=1).values[:, None] - base).max()) + 1
    count = dropped_count(q_rank, sink, window)  # [B, S]
    sum_k = k.new_zeros(B, H, q_rank.shape[1], D, dtype=acc)
    sum_v = torch.zeros_like(sum_k)
    if width > 0:
        parts = [(k, v, k_rank)] if past is None else [past, (k, v, k_rank)]
        dense_k = k.new_zeros(B, H, width + 1, D, dtype=acc)  # slot `width` takes what is not summed
        dense_v = torch.zeros_like(dense_k)
        for pk, pv, pr in parts:
            at = torch.where(pr >= base, pr - base, width).clamp(max=width)[:, None, :, None].expand(B, H, -1, D)
            dense_k.scatter_add_(2, at, pk.to(acc))
            dense_v.scatter_add_(2, at, pv.to(acc))
        upto = (q_rank - window - base).clamp(0, width - 1)[:, None, :, None].expand(B, H, -1, D)
        sum_k = dense_k[:, :, :width].cumsum(2).gather(2, upto)
        sum_v = dense_v[:, :, :width].cumsum(2).gather(2, upto)
    if sums is not None:
        sum_k, sum_v = sum_k + sums[0][:, :, None], sum_v + sums[1][:, :, None]
    n = count.clamp(min=1).to(acc)[:, None, :, None]
    return sum_k / n, sum_v / n, compensation_logit_bias(count)


def streaming_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_rank: torch.Tensor | None,
    q_rank: torch.Tensor | None,
    sink: int,
    window: int,
    scale: float,
    past: Segment | None = None,
    extra: Extra | None = None,
) -> torch.Tensor:
    """Sink + window attention of one streaming group over new tokens, plus what it cached before.

    q: [B, Hq, S, D], the last S of the L new tokens k, v [B, H, L, D] with ranks k_rank [B, L]
    (-1 = padding); q_rank [B, S]. k_rank None means no padding and no past: ranks are slot
    indices (`streaming_band`). past: the group's cache buffer before these tokens
    (runtime/cache.StreamBuffer), or None. extra: the queries' compensation tokens
    (`compensation_tokens`; needs ranks). Returns [B, Hq, S, D].
    """
    if k_rank is None:
        if extra is not None:
            raise ValueError("streaming_heads with compensation tokens needs the tokens' ranks")
        if past is not None:
            raise ValueError("streaming_heads with a cached past needs the new tokens' ranks")
        return streaming_band(q, k, v, sink, window, scale)
    idx, sink_rank = first_sink_tokens(k_rank, sink, min(k.shape[2], sink))
    fixed = (gather_slots(k, idx), gather_slots(v, idx), sink_rank)
    if past is not None:
        (pk, pv, pr), (sk, sv, sr) = past, fixed
        fixed = (torch.cat([pk, sk], dim=2), torch.cat([pv, sv], dim=2), torch.cat([pr, sr], dim=1))
    local_rank = torch.where(k_rank >= sink, k_rank, torch.full_like(k_rank, -1))  # sink tokens are in `fixed`
    return local_blocks(q, q_rank, fixed, (k, v, local_rank), sink, window, scale, extra)


def compensated_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_rank: torch.Tensor | None,
    q_rank: torch.Tensor | None,
    group: StreamGroup,
    scale: float,
    stream: StreamBuffer | None = None,
) -> torch.Tensor:
    """`streaming_heads` of a group with a compensation token: always from ranks (path 4).

    As streaming_heads (k_rank None: no padding, ranks are slots); stream: the group's cache
    buffer before these tokens, with its sums of evicted tokens, or None.
    """
    B, S, L = q.shape[0], q.shape[2], k.shape[2]
    if k_rank is None:
        k_rank = torch.arange(L, device=q.device).expand(B, L)
        q_rank = k_rank[:, L - S :]
    past = sums = None
    if stream is not None:
        past, sums = (stream.k, stream.v, stream.rank), (stream.comp_k, stream.comp_v)
    extra = compensation_tokens(k, v, k_rank, q_rank, group.sink, group.window, past, sums)
    return streaming_heads(q, k, v, k_rank, q_rank, group.sink, group.window, scale, past=past, extra=extra)


def model_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None):
    """The unmodified model's attention over a whole unpadded sequence (no cache): causal, or
    within the model's own sliding `window` (a hybrid model's local layers). q: [B, Hq, S, D],
    k, v: [B, Hkv, S, D]. What profiling hooks compute in place of transformers' own."""
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale, enable_gqa=True)
    T = k.shape[2]
    ranks = torch.arange(T, device=q.device).expand(q.shape[0], T)
    return streaming_heads(q, k, v, ranks, ranks, 0, window, scale)


# ---- the two phases -----------------------------------------------------------------------------------
def fresh_prefill(plan: LayerPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One layer, no padding, no cache: queries are the last S of the T slots of k, v [B, Hkv, T, D].

    q: [B, Hq, S, D]. Returns [B, Hq, S, D].
    """
    T = k.shape[2]
    if plan.causal_below is None or T <= plan.causal_below:  # every head causal: one call for the layer
        return causal_attention(q, k, v, scale)
    G, R = plan.group_size, plan.num_retrieval
    outs = [causal_attention(q[:, : R * G], k[:, :R], v[:, :R], scale)] if R else []
    for g in plan.groups:
        qg, kg, vg = q[:, g.start * G : g.stop * G], k[:, g.start : g.stop], v[:, g.start : g.stop]
        if g.compensate:
            outs.append(compensated_heads(qg, kg, vg, None, None, g, scale))
        else:
            outs.append(streaming_band(qg, kg, vg, g.sink, g.window, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def padded_prefill(
    plan: LayerPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pads: list[int], scale: float
) -> torch.Tensor:
    """`fresh_prefill` of each row's real tokens alone (left padding: pads[b] slots), so no mask is built.

    q: [B, Hq, S, D], the last S of the T slots of k, v. Padding queries get zeros.
    """
    S, T = q.shape[2], k.shape[2]
    out = q.new_zeros(q.shape)
    for b, pad in enumerate(pads):
        first = max(0, pad - (T - S))  # the row's first real query
        if first < S:
            rows = slice(b, b + 1)
            out[rows, :, first:] = fresh_prefill(plan, q[rows, :, first:], k[rows, :, pad:], v[rows, :, pad:], scale)
    return out


def prefill(
    plan: LayerPlan,
    q: torch.Tensor,
    scale: float,
    *,
    keys: torch.Tensor,
    values: torch.Tensor,
    k_rank: torch.Tensor | None,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    new_rank: torch.Tensor | None,
    q_rank: torch.Tensor | None,
    past: list[Segment] | None = None,
    qparts: list[QuantRetrievalPart] | None = None,
    streams: list[StreamBuffer] | None = None,
) -> torch.Tensor:
    """One layer's attention for S >= 1 queries, the last S of the L new tokens.

    q: [B, Hq, S, D]. keys/values [B, R, T, D]: what the 16-bit retrieval heads see (every token so far),
    k_rank [B, T] or None when no row is padded. new_k/new_v [B, Hkv, L, D]: the new tokens of
    all KV heads, with ranks new_rank [B, L]; q_rank [B, S] (both may be None when k_rank is and
    nothing was cached). past: each streaming group's cache buffer before this call, or None when
    nothing was cached (then new_k holds every token; dequantised for quantised groups:
    `stream_segment`). qparts: the quantised retrieval groups' storage (this call's tokens still
    at full precision in it), None when nothing was cached. A fresh sequence attends its own
    tokens at full precision, quantised heads included. streams: the cache's buffers themselves
    (what compensated groups read their sums from), with past. Returns [B, Hq, S, D].
    """
    if past is None:
        if use_kernels(q):  # a fresh sequence: the prefill kernel sees every token at once
            return _kernel("prefill", plan, q, scale, k=new_k, v=new_v, k_rank=k_rank)
        if k_rank is None:
            return fresh_prefill(plan, q, new_k, new_v, scale)
        pads = left_padding(k_rank)
        if pads is not None:
            return padded_prefill(plan, q, new_k, new_v, pads, scale)
    G, R = plan.group_size, plan.num_native_retrieval
    if new_rank is None:  # a chunk on top of an unpadded cache: ranks are slots
        T, L, S = keys.shape[2], new_k.shape[2], q.shape[2]
        new_rank = torch.arange(T - L, T, device=q.device).expand(q.shape[0], L)
        q_rank = new_rank[:, L - S :]
    outs = []
    if R:
        outs.append(retrieval_heads(q[:, : R * G], keys, values, k_rank, q_rank, scale))
    for i, rg in enumerate(plan.retrieval_groups):
        qg = q[:, rg.start * G : rg.stop * G]
        if qparts is None:  # every token is new: full precision
            kg, vg = new_k[:, rg.start : rg.stop], new_v[:, rg.start : rg.stop]
            outs.append(retrieval_heads(qg, kg, vg, k_rank, q_rank, scale))
        else:
            outs.append(quantized_retrieval_heads(qg, qparts[i], k_rank, q_rank, scale))
    for i, g in enumerate(plan.groups):
        kg, vg = new_k[:, g.start : g.stop], new_v[:, g.start : g.stop]
        qg = q[:, g.start * G : g.stop * G]
        if g.compensate:
            stream = None if past is None else streams[i]
            outs.append(compensated_heads(qg, kg, vg, new_rank, q_rank, g, scale, stream))
            continue
        seg = None if past is None else past[i]
        outs.append(streaming_heads(qg, kg, vg, new_rank, q_rank, g.sink, g.window, scale, past=seg))
    return torch.cat(outs, dim=1)


def decode_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """One query per row and head over N cached keys: q [B, Hq, 1, D]; k, v [B, H, N, D]; mask
    [B, 1, 1, N] or None (every key visible). Returns [B, Hq, 1, D], zeros for a query that sees no key.

    On one thread each KV head's Hq / H query heads go in as one sequence of queries of that
    head (as transformers' pack_gqa does): no GQA expansion, 5-25% faster at 4K-8K keys. SDPA
    on CPU parallelises over (row, head, query block), so with more threads the heads stay apart.
    """
    if q.is_cuda or torch.get_num_threads() > 1:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        B, Hq, _, D = q.shape
        H = k.shape[1]
        out = F.scaled_dot_product_attention(q.reshape(B, H, Hq // H, D), k, v, attn_mask=mask, scale=scale)
        out = out.view(B, Hq, 1, D)
    return out if mask is None else out.nan_to_num(0.0)


def decode(
    plan: LayerPlan,
    q: torch.Tensor,
    layer: SplitKVLayer,
    q_rank: torch.Tensor | None,
    k_rank: torch.Tensor | None,
    scale: float,
    retrieval_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per row over the split cache, that token already committed.

    q: [B, Hq, 1, D], q_rank [B, 1]; k_rank [B, T] of the retrieval part, None when no row is
    padded: then every buffered key is one the query may attend, so no mask is built (and
    q_rank may be None). retrieval_mask: rule.visible(q_rank, k_rank) as [B, 1, 1, T] if the
    caller has it (built once per forward), else built here.
    """
    if use_kernels(q):
        if q_rank is None:
            q_rank = torch.full((q.shape[0], 1), layer.seen - 1, device=q.device)
        return _kernel("decode", plan, q, scale, layer=layer, q_rank=q_rank, k_rank=k_rank)
    G, R = plan.group_size, plan.num_native_retrieval
    outs = []
    if R:
        mask = retrieval_mask
        if mask is None and k_rank is not None:
            mask = visible(q_rank[:, None, :, None], k_rank[:, None, None, :])
        outs.append(decode_heads(q[:, : R * G], layer.keys, layer.values, mask, scale))
    in_c = k_rank is None and plan.quantized and use_cpu_kernel(q)  # the C kernels (no mask), asked once
    for part in layer.qparts:
        qg = q[:, part.group.start * G : part.group.stop * G]
        out = _cpu_decode(qg, part.codes, part.k_tail, part.v_tail, scale) if in_c else None
        outs.append(quantized_retrieval_heads(qg, part, k_rank, q_rank, scale) if out is None else out)
    for s in layer.streams:
        g = s.group
        qg = q[:, g.start * G : g.stop * G]
        if in_c and isinstance(s, QuantStreamBuffer):
            out = _cpu_decode(qg, s.kv, None, None, scale)
            if out is not None:
                outs.append(out)
                continue
        k, v, rank = stream_segment(s, q.dtype)
        mask = None if k_rank is None else visible(q_rank[:, None, :, None], rank[:, None, None, :], g.sink, g.window)
        if g.compensate and (q_rank is not None or dropped_count(layer.seen - 1, g.sink, g.window)):
            outs.append(_decode_compensated(qg, s, mask, q_rank, layer.seen - 1, scale))  # never quantised
        else:
            outs.append(decode_heads(qg, k, v, mask, scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _cpu_decode(q, codes: QuantTokenBuffer, k_tail, v_tail, scale: float) -> torch.Tensor | None:
    """A quantised part's decode by the C kernel (codegen/cpu.py) over the tokens in use of its
    codes, then the tail, where the caller has found use_cpu_kernel(q); None where it does not
    run (no compiler, another layout): then the caller dequantises."""
    if q.shape[1] % codes.heads:
        return None
    prepared = codes.kernel(q.shape[1] // codes.heads)
    return None if prepared is None else decode_prepared(q, prepared, codes.size, k_tail, v_tail, scale)


def _decode_compensated(q, s: StreamBuffer, mask, q_rank, last: int, scale: float) -> torch.Tensor:
    """One compensated group's decode: its buffer plus the token from the sums of what it evicted
    (committed already, so they cover D_i exactly), appended as one more key with logit + log|D_i|.
    q: [B, Hq, 1, D]; mask: [B, 1, 1, N] bool or None; q_rank [B, 1] or None (every row at `last`)."""
    B, N = s.rank.shape[0], s.size
    count = dropped_count(q_rank if q_rank is not None else torch.full((B, 1), last, device=q.device),
                          s.group.sink, s.group.window)  # fmt: skip
    n = count.clamp(min=1).to(s.comp_k.dtype)[:, :, None]  # [B, 1, 1]
    k = torch.cat([s.k, (s.comp_k / n)[:, :, None].to(s.k.dtype)], dim=2)  # [B, Hg, N + 1, D]
    v = torch.cat([s.v, (s.comp_v / n)[:, :, None].to(s.v.dtype)], dim=2)
    none = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
    keys = torch.zeros(B, 1, 1, N, dtype=q.dtype, device=q.device) if mask is None else torch.where(mask, 0.0, none)
    bias = compensation_logit_bias(count).to(q.dtype)[:, None, :, None]  # [B, 1, 1, 1]
    return decode_heads(q, k, v, torch.cat([keys, bias], dim=-1), scale)


def _kernel(phase: str, plan: LayerPlan, q: torch.Tensor, scale: float, **parts) -> torch.Tensor:
    """The generated kernels (torch.ops.headpolicy.*, codegen/ops.py), with the plan's prebuilt tables."""
    if plan.compensated:
        raise UnsupportedPolicyError(
            f"layer {plan.layer}: the generated Triton kernels do not implement the compensation token; "
            "run with HEADPOLICY_KERNEL_BACKEND=reference (the PyTorch path) or a policy without compensate"
        )
    if phase == "prefill":
        k_rank = parts["k_rank"]
        pad = None if k_rank is None else (k_rank < 0).sum(-1)  # left padding: slots before rank 0
        retrieval, sink, window = plan.head_table
        return torch.ops.headpolicy.prefill_attention(q, parts["k"], parts["v"], pad, retrieval, sink, window, scale)
    args = (plan, q, parts["layer"], parts["q_rank"], parts["k_rank"], scale)
    if plan.quantized:
        return torch.ops.headpolicy.decode_attention_quantized(*decode_quantized_op_args(*args))
    return torch.ops.headpolicy.decode_attention(*decode_op_args(*args))


def decode_op_args(plan: LayerPlan, q, layer: SplitKVLayer, q_rank, k_rank, scale) -> tuple:
    """Arguments of torch.ops.headpolicy.decode_attention for one layer's step (q_rank [B, 1])."""
    s = layer.streams
    return (
        q, q_rank[:, 0], layer.keys, layer.values, k_rank,
        [x.k for x in s], [x.v for x in s], [x.rank for x in s], plan.group_sinks, plan.group_windows, scale,
    )  # fmt: skip


# ---- quantised heads: attention over what the cache stores, dequantised --------------------------------------
def stream_segment(s: StreamBuffer | QuantStreamBuffer, dtype: torch.dtype) -> Segment:
    """A streaming group's buffer as (k, v, rank); a quantised one dequantised in one block (it
    holds at most sink + window tokens)."""
    if isinstance(s, QuantStreamBuffer):
        return s.k.dequantize(dtype), s.v.dequantize(dtype), s.rank
    return s.k, s.v, s.rank


def dequantized_part(part: QuantRetrievalPart, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantised retrieval group's stored keys and values [B, H, T, D] in slot order: its coded
    prefix dequantised, then its full-precision tail. Transient: one group of one layer at a time,
    as large as that group's native cache would be."""
    n_q = part.quantized_tokens
    if not n_q:
        return part.k_tail, part.v_tail
    B, H, n_t, D = part.k_tail.shape
    k, v = (torch.empty(B, H, n_q + n_t, D, dtype=dtype, device=part.k_tail.device) for _ in range(2))
    for coded, tail, x in ((part.k, part.k_tail, k), (part.v, part.v_tail, v)):
        coded.tokens_slice(0, n_q).dequantize(dtype, out=x[:, :, :n_q])
        x[:, :, n_q:] = tail
    return k, v


def quantized_retrieval_heads(
    q: torch.Tensor, part: QuantRetrievalPart, k_rank: torch.Tensor | None, q_rank: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Causal attention of one quantised retrieval group over all its T stored tokens, as stored
    (dequantised), through SDPA: retrieval_heads' arguments and result."""
    k, v = dequantized_part(part, q.dtype)
    return retrieval_heads(q, k, v, k_rank, q_rank, scale)


def decode_quantized_op_args(plan: LayerPlan, q, layer: SplitKVLayer, q_rank, k_rank, scale) -> tuple:
    """Arguments of torch.ops.headpolicy.decode_attention_quantized for one layer's step (q_rank [B, 1]):
    the plain parts as for decode_attention, then each quantised part (policies/plan.py order)."""
    quant = [s for s in layer.streams if isinstance(s, QuantStreamBuffer)]
    plain = [s for s in layer.streams if not isinstance(s, QuantStreamBuffer)]
    B, T = q.shape[0], layer.seen
    ranks = torch.arange(T, device=q.device).expand(B, T) if k_rank is None else k_rank
    tensors, retrieval, bits, sinks, windows = [], [], [], [], []
    for part in layer.qparts:
        n_q = part.quantized_tokens
        tensors += [*part.k.tensors(), *part.v.tensors(), ranks[:, :n_q], part.k_tail, part.v_tail, ranks[:, n_q:]]
        retrieval.append(True)
        bits.append(part.group.bits)
        sinks.append(0)
        windows.append(1)
    for s in quant:
        tail = q.new_zeros(B, s.group.num_heads, 0, q.shape[-1])  # a streaming part keeps no residual
        tensors += [*s.k.tensors(), *s.v.tensors(), s.rank, tail, tail, s.rank[:, :0]]
        retrieval.append(False)
        bits.append(s.group.bits)
        sinks.append(s.group.sink)
        windows.append(s.group.window)
    return (
        q, q_rank[:, 0], layer.keys, layer.values, k_rank,
        [x.k for x in plain], [x.v for x in plain], [x.rank for x in plain],
        [x.group.sink for x in plain], [x.group.window for x in plain],
        tensors, retrieval, bits, sinks, windows, plan.kv_group, scale,
    )  # fmt: skip


# ---- the function transformers calls ------------------------------------------------------------------
def headpolicy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one layer of an applied model (registered as attn_implementation "headpolicy").

    query: [B, Hq, S, D]; key/value: the SplitKVStep that SplitKVCache.update returned, or plain
    [B, Hkv, T, D] tensors holding every token (no cache, or another Cache class).
    Returns ([B, S, Hq, D], None) like transformers' own attention functions.
    """
    plan = layer_plan(module)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    B, _, S, _ = query.shape
    if isinstance(key, SplitKVStep):
        out = _attend_step(plan, query, key, attention_mask, scale)
    else:
        T = key.shape[2]
        k_rank, q_rank, _ = _ranks(attention_mask, B, T, S)
        R = plan.num_native_retrieval
        out = prefill(plan, query, scale, keys=key[:, :R], values=value[:, :R], k_rank=k_rank, new_k=key,
                      new_v=value, new_rank=k_rank, q_rank=q_rank)  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def _ranks(attention_mask, B: int, T: int, S: int):
    """(k_rank [B, T], q_rank [B, S], seen) of a step whose S queries are the last of T slots, where
    seen [B, 1, 1, T] is what one decode query sees of the retrieval part (None for S > 1: a
    prefill masks per block); (None, None, None) when no row is padded."""
    key_mask = check_key_mask(attention_mask, B, T)
    if key_mask is None:
        return None, None, None
    k_rank = token_ranks(key_mask, B, T, device=key_mask.device)
    q_rank = k_rank[:, T - S :]
    seen = visible(q_rank[:, None, :, None], k_rank[:, None, None, :]) if S == 1 else None
    return k_rank, q_rank, seen


def _attend_step(plan: LayerPlan, q: torch.Tensor, step: SplitKVStep, attention_mask, scale: float) -> torch.Tensor:
    """A step over the split cache: attend, and commit the step's streaming tokens in order."""
    layer = step.layer
    B, _, S, _ = q.shape
    T = layer.seen
    k_rank = q_rank = seen = None
    if attention_mask is not None:  # ranks and the decode mask: worked out once per forward, not per layer
        k_rank, q_rank, seen = layer.memo.get(attention_mask, lambda m: _ranks(m, B, T, S))
    if S == 1:  # decode: the token is committed first (a ring slot it overwrites is out of its window)
        if k_rank is None and plan.fully_quantized and q.dtype == torch.float32 and use_cpu_kernel(q):
            return _decode_in_c(plan, q, step, layer, scale)
        layer.commit(step, q_rank)
        return decode(plan, q, layer, q_rank, k_rank, scale, retrieval_mask=seen)
    past = None if T == S else [stream_segment(s, q.dtype) for s in layer.streams]
    out = prefill(plan, q, scale, keys=layer.keys, values=layer.values, k_rank=k_rank, new_k=step.new_k,
                  new_v=step.new_v, new_rank=q_rank, q_rank=q_rank, past=past,
                  qparts=None if T == S else layer.qparts, streams=layer.streams)  # fmt: skip
    layer.commit(step, q_rank)
    return out


class CStep:
    """A fully quantised layer's decode step in the C kernels (codegen/cpu.LayerStep): one call per
    bit width writes the ring tokens and attends every part. Built from pointers into the layer's
    buffers, so it is rebuilt when one of them is reallocated (`sources` no longer match).

    calls: (LayerStep, its parts in order: ("retrieval", QuantRetrievalPart) or ("ring", stream index)),
    or None where the kernels declined these buffers (remembered, so that is not asked every step)."""

    def __init__(self, sources: tuple, calls: tuple | None):
        self.sources, self.calls = sources, calls

    @staticmethod
    def sources_of(layer: SplitKVLayer) -> tuple:
        """The allocations the pointers point into (reallocating any gives a new tensor)."""
        return (*(x for p in layer.qparts for x in (p.codes.allocation, p.tail.allocation)),
                *(s.kv.allocation for s in layer.streams))  # fmt: skip

    @classmethod
    def build(cls, layer: SplitKVLayer, batch: int, per_kv: int) -> CStep:
        """calls None where a part's buffers do not suit the kernels (codegen/cpu.prepare declines)."""
        declined = cls(cls.sources_of(layer), None)
        by_library: dict[int, list] = {}
        for part in layer.qparts:
            prepared = part.codes.kernel(per_kv)
            if prepared is None:
                return declined
            k_tail, v_tail = part.tail.allocated
            by_library.setdefault(id(prepared.lib), []).append(
                (StepPart(prepared, part.group.start, k_tail, v_tail), ("retrieval", part))
            )
        for i, s in enumerate(layer.streams):
            prepared = s.kv.kernel(per_kv) if isinstance(s, QuantStreamBuffer) else None
            if prepared is None:
                return declined
            by_library.setdefault(id(prepared.lib), []).append((StepPart(prepared, s.group.start), ("ring", i)))
        calls = []
        for entries in by_library.values():
            step = LayerStep.build([e[0] for e in entries], batch, layer.plan.num_kv_heads, per_kv)
            if step is None:
                return declined
            calls.append((step, tuple(e[1] for e in entries)))
        return cls(cls.sources_of(layer), tuple(calls))


def _decode_in_c(plan: LayerPlan, q: torch.Tensor, step: SplitKVStep, layer: SplitKVLayer, scale: float):
    """A decode step of a fully quantised layer without padding (q float32 on the CPU, C kernels
    on): commit, then attend, as layer.commit + decode do, with the ring writes and every part's
    attention in CStep's calls. Falls back to those where the kernels decline the buffers."""
    slots = layer.claim_token_slots()
    program = layer.kernel_step
    if program is None or any(a is not b for a, b in zip(program.sources, CStep.sources_of(layer), strict=True)):
        program = layer.kernel_step = CStep.build(layer, q.shape[0], plan.group_size)
    if program.calls is None:
        for s, slot in zip(layer.streams, slots, strict=True):
            s.kv.put(slot, *step.group_kv(s.group))
        return decode(plan, q, layer, None, None, scale)
    q, k_new, v_new = q.contiguous(), step.new_k.contiguous(), step.new_v.contiguous()
    out = torch.empty_like(q)
    for call, parts in program.calls:
        for i, (kind, part) in enumerate(parts):
            if kind == "retrieval":
                call.set(i, part.quantized_tokens, -1, part.tail.size)
            else:
                call.set(i, layer.streams[part].size, slots[part])
        if not call(q, k_new, v_new, out, scale):
            raise RuntimeError(f"layer {plan.layer}: the C decode step declined a float32 CPU step it was built for")
    return out


def headpolicy_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The dense masked reference (policies/rule.py) behind the same interface; needs K/V holding every token."""
    if isinstance(key, SplitKVStep):
        raise ValueError("the reference attention needs full K/V: use a DynamicCache, not a SplitKVCache")
    B, T = key.shape[0], key.shape[2]
    plan = layer_plan(module)
    retrieval, sink, window = plan.table_tensors(query.device)
    compensate = torch.tensor(plan.head_compensate, dtype=torch.bool, device=query.device)
    out = reference_attention(query, key, value, retrieval=retrieval, sink=sink, window=window,
                              key_valid=check_key_mask(attention_mask, B, T), scale=scaling,
                              compensate=compensate)  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def padding_mask(*, batch_size, kv_length, kv_offset=0, attention_mask=None, **kwargs) -> torch.Tensor | None:
    """Mask builder for transformers: the 2D padding mask [B, kv_length], or None when no row is padded.

    Causality and the sink/window rule are applied inside the attention ops, from token ranks;
    a 4D [B, 1, S, T] mask would cost O(S*T) memory for nothing. Built once per forward, so
    the "is anything padded" test runs once, not in every layer.
    """
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset : kv_offset + kv_length].bool()
    if mask.shape != (batch_size, kv_length):
        raise ValueError(f"padding mask of shape {tuple(attention_mask.shape)} does not cover {kv_length} keys")
    return None if bool(mask.all()) else mask


for _name, _fn in ((ATTN_NAME, headpolicy_attention), (REFERENCE_ATTN_NAME, headpolicy_reference_attention)):
    AttentionInterface.register(_name, _fn)
    AttentionMaskInterface.register(_name, padding_mask)
