"""The per-head precision rule: how a quantised KV head stores its tokens, written once.

A KV head keeps its cache at `bits` = 16 (the model's own dtype, nothing changes), 8 or 4.
Quantisation is asymmetric (KIVI, Liu et al. 2024) with float16 scales and zero points:

    code = clamp(round((x - zero) / scale), 0, 2**bits - 1)      x_hat = code * scale + zero

over a *group* of values that share one (scale, zero): zero = the group's minimum,
scale = (maximum - zero) / (2**bits - 1), both rounded to float16 (the scale rounded up, so
no code is clipped). Groups:

    keys of a retrieval head    per channel, over `group` consecutive tokens   scale [N // group, D]
    keys of a streaming head    per token, over `group` consecutive channels   scale [N, ceil(D / group)]
    values (every head)         per token, over `group` consecutive channels   scale [N, ceil(D / group)]

Keys have outlier *channels*, so grouping them along tokens (per channel) keeps those channels
apart from the rest; that is why KIVI quantises keys per channel. A streaming head's tokens
live in a ring (policies/rule.ring_slot) whose slots are overwritten one token at a time, so a
key group along tokens would mix tokens of different ages and be re-quantised on every step:
its keys are quantised per token instead, each slot on its own, when the token is stored.

A retrieval head keeps its newest tokens at full precision: the quantised prefix holds
`quantized_tokens(T, group, residual)` tokens (whole groups only), the rest, at least
`residual` and fewer than `residual + group` tokens, stay in the model's dtype and are
quantised a group at a time as they age. A streaming head keeps no residual: its ring is
already the recent window.

Codes are uint8 [..., N, D * bits / 8]; int4 codes are packed two per byte along the channel
axis, channel 2i in the low nibble and 2i + 1 in the high one (so 4 bits need an even head_dim).

`kv_head_bytes` is the exact size of one head's cache at T tokens; the policy's accounting
(schema.HeadPolicy.kv_bytes), the runtime cache and the selection all use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BITS = (16, 8, 4)  # what a head may keep: 16 = the model's own dtype (not quantised)
NATIVE_BITS = 16
DEFAULT_GROUP = 32  # values per scale/zero pair (KIVI's group size)
DEFAULT_RESIDUAL = 32  # full-precision tokens a quantised retrieval head keeps at least
SCALE_DTYPE = torch.float16
SCALE_BYTES = 2  # float16 scale and zero point
_FP16_MAX = 65504.0


def is_quantized(bits: int) -> bool:
    return bits != NATIVE_BITS


def keys_per_channel(retrieval: bool) -> bool:
    """Whether a head's keys are grouped per channel along tokens (retrieval) or per token (streaming)."""
    return retrieval


def code_dim(head_dim: int, bits: int) -> int:
    """Bytes of codes per token and head: head_dim for int8, head_dim / 2 for int4."""
    if bits == 8:
        return head_dim
    if bits == 4:
        if head_dim % 2:
            raise ValueError(f"4-bit codes pack two channels a byte: head_dim must be even, got {head_dim}")
        return head_dim // 2
    raise ValueError(f"quantised heads keep 8 or 4 bits, got {bits}")


def scale_groups(head_dim: int, group: int) -> int:
    """Channel groups per token (per-token layout); the last one may be shorter."""
    return -(-head_dim // group)


def quantized_tokens(tokens: int, group: int, residual: int) -> int:
    """Tokens of a quantised retrieval head held as codes after `tokens` tokens: whole groups,
    leaving at least `residual` (and fewer than residual + group) at full precision."""
    return max(0, tokens - residual) // group * group


# ---- bytes ------------------------------------------------------------------------------------------
def quantized_bytes(tokens: int, head_dim: int, bits: int, group: int, *, per_channel: bool) -> int:
    """Bytes of `tokens` quantised tokens of one head and one tensor (K or V): codes, scales, zeros."""
    if per_channel:
        if tokens % group:
            raise ValueError(f"per-channel groups need whole groups of {group} tokens, got {tokens}")
        scales = tokens // group * head_dim
    else:
        scales = tokens * scale_groups(head_dim, group)
    return tokens * code_dim(head_dim, bits) + 2 * SCALE_BYTES * scales


def kv_head_bytes(
    tokens: int,
    *,
    head_dim: int,
    dtype_bytes: int,
    bits: int = NATIVE_BITS,
    sink: int | None = None,
    window: int | None = None,
    group: int = DEFAULT_GROUP,
    residual: int = DEFAULT_RESIDUAL,
    allocated: bool = False,
) -> int:
    """Exact bytes of one KV head's cache (keys and values, one sequence) after `tokens` tokens.

    sink/window None: a retrieval head (every token); else a streaming head holding
    min(tokens, sink + window). dtype_bytes: the model's element size (what bits=16 keeps and
    what a retrieval head's residual keeps). Counts codes, scales and zero points; not the
    per-row token ranks a streaming buffer also keeps (one int64 per slot and row, shared by
    its heads), as the native cache does not either. allocated: a quantised retrieval head's
    residual at its buffer's capacity, min(tokens, residual + group) tokens, which is what a
    cache reserved for `tokens` allocates (runtime/quant_cache.py: the residual holds between
    `residual` and `residual + group` tokens as it ages, so it cannot be sized exactly ahead);
    otherwise the tokens it holds after exactly `tokens`.
    """
    if (sink is None) != (window is None):
        raise ValueError("give both sink and window (a streaming head) or neither (a retrieval head)")
    if sink is not None:
        kept = min(tokens, sink + window)
        if not is_quantized(bits):
            return 2 * kept * head_dim * dtype_bytes
        return 2 * quantized_bytes(kept, head_dim, bits, group, per_channel=False)
    if not is_quantized(bits):
        return 2 * tokens * head_dim * dtype_bytes
    q = quantized_tokens(tokens, group, residual)
    codes = quantized_bytes(q, head_dim, bits, group, per_channel=True)  # keys
    codes += quantized_bytes(q, head_dim, bits, group, per_channel=False)  # values
    tail = min(tokens, residual + group) if allocated else tokens - q
    return codes + 2 * tail * head_dim * dtype_bytes


# ---- quantise / dequantise ------------------------------------------------------------------------
@dataclass(frozen=True)
class Quantized:
    """Codes of N tokens of one or more heads, with their float16 scales and zero points.

    codes: uint8 [..., N, code_dim(D, bits)];
    scale, zero: float16 [..., N // group, D] when per_channel, else [..., N, ceil(D / group)].
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int
    per_channel: bool

    @property
    def head_dim(self) -> int:
        return self.codes.shape[-1] * 8 // self.bits

    @property
    def tokens(self) -> int:
        return self.codes.shape[-2]

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + self.zero.nbytes

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codes, self.scale, self.zero

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """x_hat [..., N, D] in `dtype`, computed in float32 as codes * scale + zero; written into
        `out` ([..., N, D], a slice of a larger buffer too) when given, and returned.

        The scales broadcast over their groups (a view, no repeated copy) wherever the groups are
        whole, so the work is one pass to convert the codes and one multiply-add in place."""
        D, N, g = self.head_dim, self.tokens, self.group
        codes = unpack(self.codes, self.bits)
        scale, zero = self.scale.float(), self.zero.float()
        if self.per_channel and N % g == 0:  # [..., N/g, g, D] against [..., N/g, 1, D]
            shape = (*codes.shape[:-2], N // g, g, D)
            scale, zero = scale.unsqueeze(-2), zero.unsqueeze(-2)
        elif not self.per_channel and D % g == 0:  # [..., N, D/g, g] against [..., N, D/g, 1]
            shape = (*codes.shape[:-1], D // g, g)
            scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
        else:  # a ragged last group: the scales repeated to every element
            shape = codes.shape
            axis = -2 if self.per_channel else -1
            scale = scale.repeat_interleave(g, dim=axis)[..., :N, :D]
            zero = zero.repeat_interleave(g, dim=axis)[..., :N, :D]
        if out is not None and out.dtype == torch.float32:
            x = out.view(shape)
            x.copy_(codes.reshape(shape))
        else:
            x = codes.reshape(shape).float()
        x.mul_(scale).add_(zero)
        if out is None:
            return x.view(codes.shape).to(dtype)
        if out.dtype != torch.float32:
            out.copy_(x.view(codes.shape))
        return out

    def error_bound(self) -> torch.Tensor:
        """The largest |x - x_hat| the rule allows, per element [..., N, D] (float32): half a step,
        or half a float16 ulp of the zero point (the zero is the rounded minimum), plus float32 slack."""
        D = self.head_dim
        scale, zero = self.scale.float(), self.zero.float()
        ulp = (torch.nextafter(self.zero.abs(), torch.full_like(self.zero, math.inf)) - self.zero.abs()).float()
        levels = 2**self.bits - 1
        bound = torch.maximum(scale, ulp) / 2 + 1e-6 * (zero.abs() + levels * scale)
        if self.per_channel:
            return bound.repeat_interleave(self.group, dim=-2)
        return bound.repeat_interleave(self.group, dim=-1)[..., :D]

    def tokens_slice(self, start: int, stop: int) -> Quantized:
        """Tokens [start, stop) (per_channel: both multiples of group, or stop the end)."""
        if self.per_channel:
            if start % self.group or (stop % self.group and stop != self.tokens):
                raise ValueError(f"per-channel codes split at multiples of {self.group} tokens, got {start}:{stop}")
            rows = slice(start // self.group, -(-stop // self.group))
        else:
            rows = slice(start, stop)
        return Quantized(self.codes[..., start:stop, :], self.scale[..., rows, :], self.zero[..., rows, :], self.bits,
                         self.group, self.per_channel)  # fmt: skip

    def index(self, index) -> Quantized:
        """The same tokens for a subset or reordering of the leading (batch) dimension."""
        return Quantized(self.codes[index], self.scale[index], self.zero[index], self.bits, self.group,
                         self.per_channel)  # fmt: skip


def quantize(x: torch.Tensor, bits: int, group: int, *, per_channel: bool) -> Quantized:
    """Quantise x [..., N, D] (per_channel: N a multiple of group). See the module docstring."""
    levels = 2**bits - 1
    D = x.shape[-1]
    xf = x.float().clamp(-_FP16_MAX, _FP16_MAX)  # float16 scales: larger values cannot be represented
    if per_channel:
        N = x.shape[-2]
        if N % group:
            raise ValueError(f"per-channel quantisation takes whole groups of {group} tokens, got {N}")
        xg = xf.reshape(*x.shape[:-2], N // group, group, D)
        lo, hi = xg.amin(-2, keepdim=True), xg.amax(-2, keepdim=True)
    else:
        ng = scale_groups(D, group)
        pad = ng * group - D  # a short last group: repeat its last channel (min/max unchanged)
        xp = torch.cat([xf, xf[..., -1:].expand(*xf.shape[:-1], pad)], dim=-1) if pad else xf
        xg = xp.reshape(*x.shape[:-1], ng, group)
        lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    zero = lo.to(SCALE_DTYPE)
    span = (hi - zero.float()).clamp(min=0)
    scale = (span / levels).to(SCALE_DTYPE)
    short = scale.float() * levels < span  # rounded down: the maximum would need a code past `levels`
    scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    s = scale.float()
    codes = torch.where(s > 0, (xg - zero.float()) / torch.where(s > 0, s, 1.0), 0.0)
    codes = codes.round().clamp(0, levels).to(torch.uint8)
    if per_channel:
        codes = codes.reshape(*x.shape)
        scale, zero = scale.squeeze(-2), zero.squeeze(-2)
    else:
        codes = codes.reshape(*x.shape[:-1], -1)[..., :D]
        scale, zero = scale.squeeze(-1), zero.squeeze(-1)
    return Quantized(pack(codes, bits), scale.contiguous(), zero.contiguous(), bits, group, per_channel)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] -> [..., code_dim(D, bits)] (int4: channel 2i low nibble, 2i + 1 high)."""
    code_dim(codes.shape[-1], bits)
    if bits == 8:
        return codes.contiguous()
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: uint8 [..., D]."""
    if bits == 8:
        return packed
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


def empty_quantized(lead: tuple[int, ...], head_dim: int, bits: int, group: int, *, per_channel: bool,
                    device=None) -> Quantized:  # fmt: skip
    """Zero tokens: codes [*lead, 0, code_dim] and matching empty scales/zeros."""
    scale_cols = head_dim if per_channel else scale_groups(head_dim, group)
    codes = torch.zeros(*lead, 0, code_dim(head_dim, bits), dtype=torch.uint8, device=device)
    scale = torch.zeros(*lead, 0, scale_cols, dtype=SCALE_DTYPE, device=device)
    return Quantized(codes, scale, scale.clone(), bits, group, per_channel)


def cat(parts: list[Quantized]) -> Quantized:
    """Quantised tokens one after the other (same bits, group and layout)."""
    first = parts[0]
    return Quantized(
        torch.cat([p.codes for p in parts], dim=-2),
        torch.cat([p.scale for p in parts], dim=-2),
        torch.cat([p.zero for p in parts], dim=-2),
        first.bits,
        first.group,
        first.per_channel,
    )
