"""All headpolicy attention maths: prefill and decode, PyTorch ops and the generated kernels.

After `apply`, each layer's KV heads are ordered [retrieval heads | streaming group 0 | ...]
(policies/plan.py). Retrieval heads run ordinary causal attention over every cached token.
Streaming heads run *local* attention under the sink/window rule (policies/rule.py): each
query sees the sink tokens plus its last `window` tokens, computed chunk by chunk so a
prefill costs O(S * (sink + window)) instead of O(S^2). Positions are ranks among the real
tokens of a row (rule.token_ranks); padding must be on the left.

Entry points, one per phase:
    prefill(plan, q, ...)   S >= 1 new tokens attend the cached ones and each other
    decode(plan, q, layer)  one new token per row, already committed to the split cache
`headpolicy_attention` is the function transformers calls (registered below): it routes a
layer's call to them, and commits the streaming tokens to the cache (runtime/cache.py) at
the right moment. `_kernel` is the one place that hands work to the generated Triton kernels.

Quantised heads (kv_bits 8/4, policies/precision.py; stored by runtime/quant_cache.py): a
query attends the tokens of its own call at full precision and everything cached before it
as stored, dequantised block by block on the fly (section "quantised heads" at the end). A
decode step stores its token first, so it attends that token as stored too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import headpolicy.codegen.ops  # noqa: F401  (registers torch.ops.headpolicy.prefill/decode_attention)
from headpolicy.codegen.ops import use_kernels
from headpolicy.policies.plan import LayerPlan
from headpolicy.policies.rule import reference_attention, token_ranks, visible
from headpolicy.runtime.cache import SplitKVLayer, SplitKVStep, StreamBuffer
from headpolicy.runtime.quant_cache import QuantRetrievalPart, QuantStreamBuffer
from headpolicy.runtime.state import layer_plan

ATTN_NAME = "headpolicy"
REFERENCE_ATTN_NAME = "headpolicy_reference"
CHUNK = 256  # streaming queries per block: keys per block stay ~ sink + window + CHUNK

Segment = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # k [B, H, N, D], v, rank [B, N] (-1 = empty)


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


def retrieval_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_rank: torch.Tensor | None, q_rank: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention over all T keys for queries in the last S slots.

    q: [B, Hq, S, D]; k, v: [B, H, T, D] with Hq % H == 0; k_rank [B, T] is None when no row
    is padded (then q_rank [B, S] is not read). Returns [B, Hq, S, D].
    """
    S, T = q.shape[2], k.shape[2]
    if k_rank is None:
        if S == 1 or S == T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=S > 1, scale=scale, enable_gqa=True)
        slots = torch.arange(T, device=q.device)
        mask = visible(slots[T - S :, None], slots[None, :])  # [S, T]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
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


def _chunked_local(
    q: torch.Tensor, q_rank: torch.Tensor, fixed: list[Segment], local: Segment, sink: int, window: int, scale: float
) -> torch.Tensor:
    """Sink + window attention, CHUNK queries at a time.

    fixed: segments every block sees whole (the sink tokens, the cached buffer); local: the new
    tokens in slot order, whose last S are the queries' own (ranks < sink are -1 there: those
    tokens are in a fixed segment). Returns [B, Hq, S, D].
    """
    S = q.shape[2]
    lk, lv, lr = local
    offset = lk.shape[2] - S
    fk = torch.cat([f[0] for f in fixed], dim=2)
    fv = torch.cat([f[1] for f in fixed], dim=2)
    fr = torch.cat([f[2] for f in fixed], dim=1)
    outs = []
    for a in range(0, S, CHUNK):
        b = min(S, a + CHUNK)
        lo, hi = max(0, offset + a - window + 1), offset + b
        k = torch.cat([fk, lk[:, :, lo:hi]], dim=2)
        v = torch.cat([fv, lv[:, :, lo:hi]], dim=2)
        kr = torch.cat([fr, lr[:, lo:hi]], dim=1)[:, None, :]  # [B, 1, N]
        mask = visible(q_rank[:, a:b, None], kr, sink, window)  # [B, s, N]
        outs.append(
            F.scaled_dot_product_attention(q[:, :, a:b], k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=True)
        )
    return torch.cat(outs, dim=2).nan_to_num(0.0)


def streaming_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_rank: torch.Tensor,
    q_rank: torch.Tensor,
    sink: int,
    window: int,
    scale: float,
    past: Segment | None = None,
) -> torch.Tensor:
    """Sink + window attention of one streaming group over new tokens, plus what it cached before.

    q: [B, Hq, S, D], the last S of the L new tokens k, v [B, H, L, D] with ranks k_rank [B, L]
    (-1 = padding); q_rank [B, S]. past: the group's cache buffer before these tokens
    (runtime/cache.StreamBuffer), or None. Returns [B, Hq, S, D].
    """
    idx, sink_rank = first_sink_tokens(k_rank, sink, min(k.shape[2], sink))
    sinks = (gather_slots(k, idx), gather_slots(v, idx), sink_rank)
    local_rank = torch.where(k_rank >= sink, k_rank, torch.full_like(k_rank, -1))
    fixed = [sinks] if past is None else [past, sinks]
    return _chunked_local(q, q_rank, fixed, (k, v, local_rank), sink, window, scale)


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
    new_rank: torch.Tensor,
    q_rank: torch.Tensor,
    past: list[Segment] | None = None,
    qparts: list[QuantRetrievalPart] | None = None,
) -> torch.Tensor:
    """One layer's attention for S >= 1 queries, the last S of the L new tokens.

    q: [B, Hq, S, D]. keys/values [B, R, T, D]: what the 16-bit retrieval heads see (every token
    so far), k_rank [B, T] or None when no row is padded. new_k/new_v [B, Hkv, L, D]: the new
    tokens of all KV heads, with ranks new_rank [B, L]; q_rank [B, S]. past: each streaming
    group's cache buffer before this call (dequantised: `stream_segment`), or None when nothing
    was cached (then new_k holds every token). qparts: the quantised retrieval groups' storage
    (this call's tokens still at full precision in it), None when nothing was cached.
    Returns [B, Hq, S, D].
    """
    if past is None and use_kernels(q):  # a fresh sequence: the prefill kernel sees every token at once
        return _kernel("prefill", plan, q, scale, k=new_k, v=new_v, k_rank=k_rank)
    G, R = plan.group_size, plan.num_native_retrieval
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
        seg = None if past is None else past[i]
        outs.append(streaming_heads(qg, kg, vg, new_rank, q_rank, g.sink, g.window, scale, past=seg))
    return torch.cat(outs, dim=1)


def decode(
    plan: LayerPlan, q: torch.Tensor, layer: SplitKVLayer, q_rank: torch.Tensor, k_rank: torch.Tensor | None, scale
) -> torch.Tensor:
    """One new token per row over the split cache, that token already committed.

    q: [B, Hq, 1, D], q_rank [B, 1]; k_rank [B, T] of the retrieval part, None when no row is
    padded: then every buffered key is one the query may attend, so no mask is built.
    """
    if use_kernels(q):
        return _kernel("decode", plan, q, scale, layer=layer, q_rank=q_rank, k_rank=k_rank)
    G, R = plan.group_size, plan.num_native_retrieval
    outs = []
    if R:
        outs.append(retrieval_heads(q[:, : R * G], layer.keys, layer.values, k_rank, q_rank, scale))
    for part in layer.qparts:
        g = part.group
        outs.append(quantized_retrieval_heads(q[:, g.start * G : g.stop * G], part, k_rank, q_rank, scale))
    for s in layer.streams:
        g = s.group
        qg = q[:, g.start * G : g.stop * G]
        k, v, rank = stream_segment(s, q.dtype)
        if k_rank is None:
            outs.append(F.scaled_dot_product_attention(qg, k, v, scale=scale, enable_gqa=True))
            continue
        mask = visible(q_rank[:, None, :, None], rank[:, None, None, :], g.sink, g.window)
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(out.nan_to_num(0.0))
    return torch.cat(outs, dim=1)


def _kernel(phase: str, plan: LayerPlan, q: torch.Tensor, scale: float, **parts) -> torch.Tensor:
    """The generated kernels (torch.ops.headpolicy.*, codegen/ops.py), with the plan's prebuilt tables."""
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


# ---- quantised heads: dequantise block by block ---------------------------------------------------------
QBLOCK = 1024  # quantised tokens dequantised at once (rounded down to whole key groups)


def stream_segment(s: StreamBuffer | QuantStreamBuffer, dtype: torch.dtype) -> Segment:
    """A streaming group's buffer as (k, v, rank); a quantised one dequantised in one block (it
    holds at most sink + window tokens)."""
    if isinstance(s, QuantStreamBuffer):
        return s.k.dequantize(dtype), s.v.dequantize(dtype), s.rank
    return s.k, s.v, s.rank


def quantized_retrieval_blocks(part: QuantRetrievalPart, dtype: torch.dtype):
    """(first slot, k, v) blocks of a quantised retrieval group in slot order: its quantised prefix
    dequantised QBLOCK tokens at a time, then its full-precision tail. k, v: [B, H, n, D]."""
    n_q = part.quantized_tokens
    step = max(part.kv_group, QBLOCK // part.kv_group * part.kv_group)
    for a in range(0, n_q, step):
        b = min(n_q, a + step)
        yield a, part.k.tokens_slice(a, b).dequantize(dtype), part.v.tokens_slice(a, b).dequantize(dtype)
    if part.k_tail.shape[2]:
        yield n_q, part.k_tail, part.v_tail


def quantized_retrieval_heads(
    q: torch.Tensor, part: QuantRetrievalPart, k_rank: torch.Tensor | None, q_rank: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of one quantised retrieval group over all its T stored tokens, dequantised
    block by block with an online softmax (never the whole cache at once).

    q: [B, Hq, S, D] (the group's query heads, the last S slots); k_rank [B, T] or None when no
    row is padded (then slot t has rank t); q_rank [B, S]. Returns [B, Hq, S, D].
    """
    B = q.shape[0]
    qr = q_rank[:, None, :, None]  # [B, 1, S, 1]

    def blocks():
        for a, k, v in quantized_retrieval_blocks(part, q.dtype):
            n = k.shape[2]
            kr = torch.arange(a, a + n, device=q.device).expand(B, n) if k_rank is None else k_rank[:, a : a + n]
            yield k, v, visible(qr, kr[:, None, None, :])

    return online_softmax_attention(q, blocks(), scale)


def online_softmax_attention(q: torch.Tensor, blocks, scale: float) -> torch.Tensor:
    """Softmax attention over key blocks seen one at a time (running max and sum, float32).

    q: [B, Hq, S, D]; blocks: (k, v [B, H, n, D], allowed [B, 1, S, n] bool) with Hq % H == 0.
    Query rows that see no key are zeros. Returns [B, Hq, S, D] in q.dtype.
    """
    B, Hq, S, D = q.shape
    m = total = acc = None
    for k, v, allowed in blocks:
        H = k.shape[1]
        qf = q.float().view(B, H, Hq // H, S, D)
        s = torch.einsum("bhgsd,bhnd->bhgsn", qf, k.float()) * scale
        s = s.masked_fill(~allowed[:, :, None], float("-inf"))
        m_new = s.amax(-1) if m is None else torch.maximum(m, s.amax(-1))
        m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # no key yet: nothing to shift
        p = torch.exp(s - m_use[..., None])
        pv = torch.einsum("bhgsn,bhnd->bhgsd", p, v.float())
        if m is None:
            total, acc = p.sum(-1), pv
        else:
            alpha = torch.exp(m - m_use)
            total, acc = total * alpha + p.sum(-1), acc * alpha[..., None] + pv
        m = m_new
    if m is None:
        return torch.zeros_like(q)
    out = acc / torch.where(total == 0, torch.ones_like(total), total)[..., None]
    return out.reshape(B, Hq, S, D).to(q.dtype)


def decode_quantized_op_args(plan: LayerPlan, q, layer: SplitKVLayer, q_rank, k_rank, scale) -> tuple:
    """Arguments of torch.ops.headpolicy.decode_attention_quantized for one layer's step (q_rank [B, 1]):
    the plain parts as for decode_attention, then each quantised part (policies/plan.py order)."""
    plain = [s for s in layer.streams if isinstance(s, StreamBuffer)]
    quant = [s for s in layer.streams if isinstance(s, QuantStreamBuffer)]
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
        key_mask = check_key_mask(attention_mask, B, T)
        ranks = token_ranks(key_mask, B, T, device=query.device)
        R = plan.num_native_retrieval
        out = prefill(plan, query, scale, keys=key[:, :R], values=value[:, :R], k_rank=None if key_mask is None
                      else ranks, new_k=key, new_v=value, new_rank=ranks, q_rank=ranks[:, T - S :])  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def _attend_step(plan: LayerPlan, q: torch.Tensor, step: SplitKVStep, attention_mask, scale: float) -> torch.Tensor:
    """A step over the split cache: attend, and commit the step's streaming tokens in order."""
    layer = step.layer
    B, _, S, _ = q.shape
    T = layer.seen
    key_mask = check_key_mask(attention_mask, B, T)
    if key_mask is None:  # no padding anywhere: every row has the same ranks
        k_rank = None
        q_rank = torch.arange(T - S, T, device=q.device).expand(B, S)
    else:
        k_rank = token_ranks(key_mask, B, T, device=q.device)
        q_rank = k_rank[:, T - S :]
    commit_rank = None if key_mask is None else q_rank
    if S == 1:  # decode: the token is committed first (a ring slot it overwrites is out of its window)
        layer.commit(step, commit_rank)
        return decode(plan, q, layer, q_rank, k_rank, scale)
    past = None if T == S else [stream_segment(s, q.dtype) for s in layer.streams]
    out = prefill(plan, q, scale, keys=layer.keys, values=layer.values, k_rank=k_rank, new_k=step.new_k,
                  new_v=step.new_v, new_rank=q_rank, q_rank=q_rank, past=past,
                  qparts=None if T == S else layer.qparts)  # fmt: skip
    layer.commit(step, commit_rank)
    return out


def headpolicy_reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The dense masked reference (policies/rule.py) behind the same interface; needs K/V holding every token."""
    if isinstance(key, SplitKVStep):
        raise ValueError("the reference attention needs full K/V: use a DynamicCache, not a SplitKVCache")
    B, T = key.shape[0], key.shape[2]
    retrieval, sink, window = layer_plan(module).table_tensors(query.device)
    out = reference_attention(query, key, value, retrieval=retrieval, sink=sink, window=window,
                              key_valid=check_key_mask(attention_mask, B, T), scale=scaling)  # fmt: skip
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
