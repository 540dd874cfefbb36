"""Quantised parts of the split KV cache: storage only, laid out by policies/precision.py.

A layer's quantised heads (policies/plan.py: `plan.retrieval_groups`, and streaming groups
with bits < 16) keep their tokens here; runtime/cache.SplitKVLayer holds these objects next
to its plain tensors and drives them through the same update/commit steps:

    QuantRetrievalPart   every token of a RetrievalGroup [B, H, T, D] as
                           k: per-channel codes of the first Q tokens (whole groups along tokens)
                           v: per-token codes of the same Q tokens
                           k_tail, v_tail: the last T - Q tokens in the model's dtype
                         with Q = precision.quantized_tokens(T, kv_group, kv_residual).
                         update() appends new tokens to the tail; commit() quantises the
                         whole groups that have aged out of the residual.
    QuantStreamBuffer    a streaming group's sink + ring (the layout of cache.StreamBuffer),
                         each slot's key and value quantised per token when it is written,
                         so overwriting a ring slot never touches another slot's scales.

Tensors grow by concatenation, exactly as far as they are filled: `nbytes` is what is allocated.
"""

from __future__ import annotations

import torch

from headpolicy.policies.plan import RetrievalGroup, StreamGroup
from headpolicy.policies.precision import Quantized, cat, empty_quantized, quantize, quantized_tokens
from headpolicy.policies.rule import ring_slot


class QuantRetrievalPart:
    """One quantised retrieval group: a quantised prefix (k, v: Quantized) + a full-precision tail."""

    def __init__(self, group: RetrievalGroup, kv_group: int, residual: int, batch: int, dim: int, dtype, device):
        self.group, self.kv_group, self.residual = group, kv_group, residual
        lead = (batch, group.num_heads)
        self.k = empty_quantized(lead, dim, group.bits, kv_group, per_channel=True, device=device)
        self.v = empty_quantized(lead, dim, group.bits, kv_group, per_channel=False, device=device)
        self.k_tail = torch.zeros(*lead, 0, dim, dtype=dtype, device=device)
        self.v_tail = torch.zeros_like(self.k_tail)

    @property
    def quantized_tokens(self) -> int:
        return self.k.tokens

    @property
    def tokens(self) -> int:
        return self.k.tokens + self.k_tail.shape[2]

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append new tokens k, v [B, H, S, D] at full precision (SplitKVLayer.update)."""
        self.k_tail = torch.cat([self.k_tail, k], dim=2)
        self.v_tail = torch.cat([self.v_tail, v], dim=2)

    def commit(self, rank: torch.Tensor | None) -> None:
        """After the step's attention: zero the padding slots among the newest tokens (rank [B, S],
        -1 = padding; None: none), so they never widen a group's range, then quantise every whole
        group that is older than the residual."""
        if rank is not None:
            S = rank.shape[1]
            pad = (rank < 0)[:, None, :, None]
            self.k_tail[:, :, -S:] = self.k_tail[:, :, -S:].masked_fill(pad, 0)
            self.v_tail[:, :, -S:] = self.v_tail[:, :, -S:].masked_fill(pad, 0)
        n = quantized_tokens(self.tokens, self.kv_group, self.residual) - self.quantized_tokens
        if n <= 0:
            return
        bits = self.group.bits
        self.k = cat([self.k, quantize(self.k_tail[:, :, :n], bits, self.kv_group, per_channel=True)])
        self.v = cat([self.v, quantize(self.v_tail[:, :, :n], bits, self.kv_group, per_channel=False)])
        self.k_tail = self.k_tail[:, :, n:].clone()  # a copy: the slice would keep the old storage alive
        self.v_tail = self.v_tail[:, :, n:].clone()

    def select_batch(self, index: torch.Tensor) -> None:
        self.k, self.v = self.k.index(index), self.v.index(index)
        self.k_tail, self.v_tail = self.k_tail[index], self.v_tail[index]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.k_tail.nbytes + self.v_tail.nbytes


class QuantStreamBuffer:
    """One quantised streaming group: k, v Quantized per token [B, Hg, n] and ranks [B, n] (-1 = empty),
    n <= sink + window, slots as in cache.StreamBuffer (policies/rule.ring_slot)."""

    def __init__(self, group: StreamGroup, kv_group: int, batch: int, dim: int, device):
        self.group = group
        lead = (batch, group.num_heads)
        self.k = empty_quantized(lead, dim, group.bits, kv_group, per_channel=False, device=device)
        self.v = empty_quantized(lead, dim, group.bits, kv_group, per_channel=False, device=device)
        self.rank = torch.full((batch, 0), -1, dtype=torch.long, device=device)

    @property
    def size(self) -> int:
        return self.rank.shape[1]

    def _quantize(self, x: torch.Tensor) -> Quantized:
        return quantize(x, self.group.bits, self.k.group, per_channel=False)

    def _grow(self, n: int) -> None:
        extra = min(n, self.group.sink + self.group.window) - self.size
        if extra <= 0:
            return
        self.k, self.v = cat([self.k, _zeros(self.k, extra)]), cat([self.v, _zeros(self.v, extra)])
        self.rank = torch.cat([self.rank, self.rank.new_full((self.rank.shape[0], extra), -1)], dim=1)

    def commit(self, k: torch.Tensor, v: torch.Tensor, rank: torch.Tensor) -> None:
        """Store new tokens k, v: [B, Hg, S, D] with ranks [B, S] (-1 = padding)."""
        sink, window = self.group.sink, self.group.window
        last = rank.max(dim=1, keepdim=True).values
        keep = (rank >= 0) & ((rank < sink) | (rank > last - window))  # only the newest `window` survive
        b, s = keep.nonzero(as_tuple=True)
        if b.numel() == 0:
            return
        self._grow(int(rank.max()) + 1)
        dst = ring_slot(rank[b, s], sink, window)
        for stored, new in ((self.k, self._quantize(k)), (self.v, self._quantize(v))):
            for t, n in zip(stored.tensors(), new.tensors(), strict=True):
                t.transpose(1, 2)[b, dst] = n.transpose(1, 2)[b, s]
        self.rank[b, dst] = rank[b, s]

    def append(self, k: torch.Tensor, v: torch.Tensor, rank: int) -> None:
        """One new token with the same rank in every row (no padding). k, v: [B, Hg, 1, D]."""
        slot = ring_slot(rank, self.group.sink, self.group.window)
        qk, qv = self._quantize(k), self._quantize(v)
        if slot == self.size:  # still filling up
            self.k, self.v = cat([self.k, qk]), cat([self.v, qv])
            self.rank = torch.cat([self.rank, self.rank.new_full((k.shape[0], 1), rank)], dim=1)
            return
        for stored, new in ((self.k, qk), (self.v, qv)):
            for t, n in zip(stored.tensors(), new.tensors(), strict=True):
                t[:, :, slot] = n[:, :, 0]
        self.rank[:, slot] = rank

    def select_batch(self, index: torch.Tensor) -> None:
        self.k, self.v, self.rank = self.k.index(index), self.v.index(index), self.rank[index]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def _zeros(q: Quantized, tokens: int) -> Quantized:
    """`tokens` empty slots in the layout of q (all-zero codes, scales and zeros)."""
    empty = (t.new_zeros(*t.shape[:-2], tokens, t.shape[-1]) for t in q.tensors())
    return Quantized(*empty, q.bits, q.group, q.per_channel)
