"""Quantised parts of the split KV cache: storage only, laid out by policies/precision.py.

A layer's quantised heads (policies/plan.py: `plan.retrieval_groups`, and streaming groups
with bits < 16) keep their tokens here; runtime/cache.SplitKVLayer holds these objects next
to its plain buffers and drives them through the same update/commit steps:

    QuantTokenBuffer     runtime/buffers.TokenBuffer's interface over codes: it takes tokens in
                         the model's dtype and stores them as a precision.Quantized key and value
                         (codes, float16 scales and zeros) preallocated for `capacity` tokens
    QuantRetrievalPart   every token of a RetrievalGroup [B, H, T, D] as
                           k, v: codes of the first Q tokens (keys per channel in whole token
                                 groups, values per token)
                           k_tail, v_tail: the last T - Q tokens in the model's dtype
                         with Q = precision.quantized_tokens(T, kv_group, kv_residual).
                         update() appends new tokens to the tail; commit() quantises the
                         whole groups that have aged out of the residual.
    QuantStreamBuffer    a streaming group's sink + ring (buffers.StreamBuffer) over a
                         QuantTokenBuffer: each slot's key and value quantised per token when it
                         is written, so overwriting a ring slot never touches another slot's scales.

Memory follows runtime/buffers.py: buffers are allocated ahead and grown in blocks; `nbytes`
is everything allocated (codes, scales, zeros, residual, spare capacity included) and
`used_nbytes` the bytes of the tokens held, which is what precision.kv_head_bytes counts.
A reserved cache allocates its codes exactly; the residual is the one part that cannot be
sized exactly ahead: it holds between `residual` and `residual + group` tokens as it ages,
so its buffer keeps `residual + group` slots (after a prefill it is trimmed back to that).
"""

from __future__ import annotations

import torch

from headpolicy.codegen.cpu import Prepared, prepare, put_token
from headpolicy.codegen.ops import use_cpu_kernel
from headpolicy.policies.plan import RetrievalGroup, StreamGroup
from headpolicy.policies.precision import Quantized, empty_quantized, quantize, quantized_tokens
from headpolicy.runtime.buffers import StreamBuffer, TokenBuffer, grown_capacity


def _blank(like: Quantized, tokens: int) -> Quantized:
    """`tokens` all-zero slots (codes, scales, zeros) in the layout of `like`."""
    rows = tokens // like.group if like.per_channel else tokens  # of the scales and zeros
    sizes = zip(like.tensors(), (tokens, rows, rows), strict=True)
    blank = [t.new_zeros(*t.shape[:-2], n, t.shape[-1]) for t, n in sizes]
    return Quantized(*blank, like.bits, like.group, like.per_channel)


class QuantTokenBuffer:
    """Quantised keys and values of `capacity` token slots [B, H, capacity, *] whose first `size`
    hold tokens. Keys are grouped per channel along tokens when keys_per_channel (then capacity,
    size and every append come in whole groups of `group` tokens), else per token like values.

    k, v: precision.Quantized views of the slots in use (no copy).
    """

    def __init__(self, batch: int, heads: int, dim: int, bits: int, group: int, *, keys_per_channel: bool, device,
                 limit: int | None = None):  # fmt: skip
        lead = (batch, heads)
        self._k = empty_quantized(lead, dim, bits, group, per_channel=keys_per_channel, device=device)
        self._v = empty_quantized(lead, dim, bits, group, per_channel=False, device=device)
        self.size = 0
        self.limit = limit
        self._prepared: dict[int, Prepared | None] = {}  # queries per KV head -> the C kernels' view

    @property
    def capacity(self) -> int:
        return self._k.tokens

    @property
    def heads(self) -> int:
        return self._k.codes.shape[1]

    def kernel(self, per_kv: int = 1) -> Prepared | None:
        """The whole allocation prepared for codegen/cpu.py (None where its kernels do not apply),
        checked once per allocation rather than once per call."""
        if per_kv not in self._prepared:
            self._prepared[per_kv] = prepare(self._k, self._v, per_kv)
        return self._prepared[per_kv]

    @property
    def k(self) -> Quantized:
        return self._k.tokens_slice(0, self.size)

    @property
    def v(self) -> Quantized:
        return self._v.tokens_slice(0, self.size)

    def _whole(self, n: int) -> int:
        """n rounded up to whole key groups (per-channel keys only)."""
        g = self._k.group
        return -(-n // g) * g if self._k.per_channel else n

    def reserve(self, n: int) -> None:
        if n > self.capacity:
            self._resize(self._whole(grown_capacity(n, self.capacity, self.limit)))

    def reserve_exactly(self, n: int) -> None:
        if self.limit is not None:
            n = min(n, self.limit)
        if self._whole(n) > self.capacity:
            self._resize(self._whole(n))

    def _resize(self, capacity: int) -> None:
        k, v = _blank(self._k, capacity), _blank(self._v, capacity)
        for new, old in ((k, self.k), (v, self.v)):
            for t, o in zip(new.tensors(), old.tensors(), strict=True):
                t[..., : o.shape[-2], :] = o
        self._k, self._v = k, v
        self._prepared = {}

    def use(self, n: int) -> None:
        if n > self.size:
            self.reserve(n)
            self.size = n

    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> tuple[Quantized, Quantized]:
        qk = quantize(k, self._k.bits, self._k.group, per_channel=self._k.per_channel)
        return qk, quantize(v, self._v.bits, self._v.group, per_channel=False)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, H, S, D] (the model's dtype) quantised into the next S slots."""
        S = k.shape[2]
        self.reserve(self.size + S)
        for stored, new in zip((self._k, self._v), self._quantize(k, v), strict=True):
            row = self.size // stored.group if stored.per_channel else self.size  # of the scales and zeros
            stored.codes.narrow(-2, self.size, S).copy_(new.codes)
            stored.scale.narrow(-2, row, new.scale.shape[-2]).copy_(new.scale)
            stored.zero.narrow(-2, row, new.zero.shape[-2]).copy_(new.zero)
        self.size += S

    def put(self, slots: torch.Tensor | int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, H, n, D] into slots [n] (or one int slot) of every row; per-token layout only."""
        if isinstance(slots, int) and k.shape[2] == 1 and use_cpu_kernel(k):  # a decode step's token, in C
            prepared = self.kernel()
            if prepared is not None and put_token(prepared, slots, k[:, :, 0], v[:, :, 0]):
                return
        for stored, new in zip((self._k, self._v), self._quantize(k, v), strict=True):
            for t, n in zip(stored.tensors(), new.tensors(), strict=True):
                if isinstance(slots, int):
                    t.select(2, slots).copy_(n.select(2, 0))
                else:
                    t.index_copy_(2, slots, n)

    def put_rows(self, rows: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Token i of k, v [n, H, D] into slot slots[i] of row rows[i]; per-token layout only."""
        for stored, new in zip((self._k, self._v), self._quantize(k, v), strict=True):
            for t, n in zip(stored.tensors(), new.tensors(), strict=True):  # n: [n, H, *] (tokens as rows)
                t.transpose(1, 2)[rows, slots] = n

    def select_batch(self, index: torch.Tensor) -> None:
        self._k, self._v = self._k.index(index), self._v.index(index)
        self._prepared = {}

    @property
    def allocated(self) -> tuple[torch.Tensor, ...]:
        """Every tensor allocated (what `nbytes` counts)."""
        return (*self._k.tensors(), *self._v.tensors())

    @property
    def allocation(self) -> Quantized:
        """The keys' codes and scales: a new object whenever the buffers are reallocated (compare by identity)."""
        return self._k

    @property
    def nbytes(self) -> int:
        return self._k.nbytes + self._v.nbytes

    @property
    def used_nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class QuantRetrievalPart:
    """One quantised retrieval group: a quantised prefix (codes) + a full-precision tail (residual)."""

    def __init__(self, group: RetrievalGroup, kv_group: int, residual: int, batch: int, dim: int, dtype, device):
        self.group, self.kv_group, self.residual = group, kv_group, residual
        self.codes = QuantTokenBuffer(batch, group.num_heads, dim, group.bits, kv_group, keys_per_channel=True,
                                      device=device)  # fmt: skip
        # the residual holds < residual + kv_group tokens after each commit, and one step more before it
        self.tail = TokenBuffer(batch, group.num_heads, dim, dtype, device, limit=residual + kv_group)

    @property
    def k(self) -> Quantized:
        return self.codes.k

    @property
    def v(self) -> Quantized:
        return self.codes.v

    @property
    def k_tail(self) -> torch.Tensor:
        return self.tail.k

    @property
    def v_tail(self) -> torch.Tensor:
        return self.tail.v

    @property
    def quantized_tokens(self) -> int:
        return self.codes.size

    @property
    def tokens(self) -> int:
        return self.codes.size + self.tail.size

    def reserve(self, tokens: int) -> None:
        """Allocate for `tokens` tokens: their whole groups of codes exactly, and the residual's bound."""
        self.codes.reserve_exactly(quantized_tokens(tokens, self.kv_group, self.residual))
        self.tail.reserve_exactly(tokens)  # at most residual + kv_group (the buffer's limit)

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append new tokens k, v [B, H, S, D] at full precision (SplitKVLayer.update)."""
        self.tail.append(k, v)

    def commit(self, rank: torch.Tensor | None) -> None:
        """After the step's attention: zero the padding slots among the newest tokens (rank [B, S],
        -1 = padding; None: none), so they never widen a group's range, then quantise every whole
        group that is older than the residual."""
        if rank is not None:
            S = rank.shape[1]
            pad = (rank < 0)[:, None, :, None]
            for t in (self.k_tail, self.v_tail):
                t[:, :, -S:] = t[:, :, -S:].masked_fill(pad, 0)
        n = quantized_tokens(self.tokens, self.kv_group, self.residual) - self.quantized_tokens
        if n > 0:
            self.codes.append(self.k_tail[:, :, :n], self.v_tail[:, :, :n])
            self.tail.drop_front(n)
        self.tail.trim(self.tail.limit)  # a prefill's burst of full-precision tokens is given back

    def select_batch(self, index: torch.Tensor) -> None:
        self.codes.select_batch(index)
        self.tail.select_batch(index)

    @property
    def allocated(self) -> tuple[torch.Tensor, ...]:
        return (*self.codes.allocated, *self.tail.allocated)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.tail.nbytes

    @property
    def used_nbytes(self) -> int:
        return self.codes.used_nbytes + self.tail.used_nbytes


class QuantStreamBuffer(StreamBuffer):
    """A quantised streaming group: buffers.StreamBuffer whose k, v are precision.Quantized per token
    [B, Hg, n] (n <= sink + window), ranks [B, n] (-1 = empty)."""

    def __init__(self, group: StreamGroup, kv_group: int, batch: int, dim: int, device):
        self.kv_group = kv_group
        super().__init__(group, batch, dim, None, device)

    def _buffer(self, batch: int, dim: int, dtype, device) -> QuantTokenBuffer:
        g = self.group
        return QuantTokenBuffer(batch, g.num_heads, dim, g.bits, self.kv_group, keys_per_channel=False,
                                device=device, limit=g.sink + g.window)  # fmt: skip
