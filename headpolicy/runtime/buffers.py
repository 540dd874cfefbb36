"""Token storage of the split cache, preallocated and grown in blocks (runtime/cache.py uses it).

    TokenBuffer    keys and values [B, H, capacity, D]; the first `size` slots hold tokens
    StreamBuffer   one streaming group: a TokenBuffer of at most sink + window slots + ranks,
                   each token in the slot `rule.ring_slot` gives its rank; a compensated group
                   (rule.py's compensation token) also keeps comp_k/comp_v [B, Hg, D], the
                   float32 (or wider) sums of the keys/values it evicted

A decode step writes its token into free capacity instead of copying the whole cache
(torch.cat), so appending costs O(1) amortised; `nbytes` is the capacity allocated,
`used_nbytes` the bytes of the slots in use. runtime/quant_cache.py builds the quantised
variants on the same interface.
"""

from __future__ import annotations

import torch

from headpolicy.policies.plan import StreamGroup
from headpolicy.policies.rule import kept, ring_slot

GROW_MIN = 256  # tokens: the smallest block a buffer grows by
GROW_SHARE = 16  # ... or 1/GROW_SHARE of what it holds: <= 16 token copies per appended token, <= 1/16 unused


def grown_capacity(needed: int, capacity: int, limit: int | None = None) -> int:
    """Slots to allocate when `needed` slots do not fit in `capacity`: at least one block more,
    so that appending one token at a time copies the buffer only every max(GROW_MIN, capacity
    / GROW_SHARE) tokens (amortised O(1) per token); never more than `limit`."""
    new = max(needed, capacity + max(GROW_MIN, capacity // GROW_SHARE))
    return new if limit is None else min(new, max(limit, needed))


class TokenBuffer:
    """Keys and values [B, H, capacity, D] whose first `size` slots hold tokens; grows in blocks.

    k, v: views [B, H, size, D] of the slots in use (no copy). Unused capacity is zeros, so a
    slot that a masked-out row never wrote holds finite values.
    """

    def __init__(self, batch: int, heads: int, dim: int, dtype, device, limit: int | None = None):
        self._k = torch.zeros(batch, heads, 0, dim, dtype=dtype, device=device)
        self._v = torch.zeros_like(self._k)
        self.size = 0
        self.limit = limit  # capacity never exceeds this (a streaming buffer's sink + window)

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    @property
    def k(self) -> torch.Tensor:
        return self._k[:, :, : self.size]

    @property
    def v(self) -> torch.Tensor:
        return self._v[:, :, : self.size]

    def reserve(self, n: int) -> None:
        """Make room for n slots (n <= limit for a bounded buffer), growing by at least a block."""
        if n <= self.capacity:
            return
        self._resize(grown_capacity(n, self.capacity, self.limit))

    def reserve_exactly(self, n: int) -> None:
        """Capacity for n slots and not more (a caller that knows how many tokens will come)."""
        if self.limit is not None:
            n = min(n, self.limit)
        if n > self.capacity:
            self._resize(n)

    def _resize(self, capacity: int) -> None:
        B, H, _, D = self._k.shape
        k, v = self._k.new_zeros(B, H, capacity, D), self._v.new_zeros(B, H, capacity, D)
        k[:, :, : self.size] = self.k
        v[:, :, : self.size] = self.v
        self._k, self._v = k, v

    def use(self, n: int) -> None:
        """Slots [0, n) in use (allocating as `reserve` does); slots never written hold zeros."""
        if n > self.size:
            self.reserve(n)
            self.size = n

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [B, H, S, D] into the next S slots."""
        S = k.shape[2]
        self.reserve(self.size + S)
        self._k.narrow(2, self.size, S).copy_(k)  # narrow/select + copy_: cheaper than indexing, per step
        self._v.narrow(2, self.size, S).copy_(v)
        self.size += S

    def put(self, slots: torch.Tensor | int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, H, n, D] into slots [n] (or one int slot, n = 1) of every row; slots < size."""
        if isinstance(slots, int):
            self._k.select(2, slots).copy_(k.select(2, 0))
            self._v.select(2, slots).copy_(v.select(2, 0))
        else:
            self._k.index_copy_(2, slots, k)
            self._v.index_copy_(2, slots, v)

    def put_rows(self, rows: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Token i of k, v [n, H, D] into slot slots[i] of row rows[i]."""
        self._k.transpose(1, 2)[rows, slots] = k
        self._v.transpose(1, 2)[rows, slots] = v

    def drop_front(self, n: int) -> None:
        """Forget the first n slots: slots [n, size) move to [0, size - n)."""
        keep = self.size - n
        if keep > 0:
            self._k[:, :, :keep] = self._k[:, :, n : self.size].clone()  # the ranges may overlap
            self._v[:, :, :keep] = self._v[:, :, n : self.size].clone()
        self.size = max(0, keep)

    def trim(self, capacity: int) -> None:
        """Give back capacity beyond max(capacity, size) (after a burst larger than the steady state)."""
        if self.capacity > max(capacity, self.size):
            self._resize(max(capacity, self.size))

    def select_batch(self, index: torch.Tensor) -> None:
        self._k, self._v = self._k[index], self._v[index]

    @property
    def allocated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value buffers [B, H, capacity, D] (what `nbytes` counts)."""
        return self._k, self._v

    @property
    def allocation(self) -> torch.Tensor:
        """The key buffer: a new object whenever the buffers are reallocated (compare by identity)."""
        return self._k

    @property
    def nbytes(self) -> int:
        """Bytes allocated (the whole capacity)."""
        return self._k.nbytes + self._v.nbytes

    @property
    def used_nbytes(self) -> int:
        """Bytes of the slots in use."""
        B, H, _, D = self._k.shape
        return 2 * B * H * self.size * D * self._k.element_size()


class StreamBuffer:
    """One streaming group's tokens: k, v [B, Hg, n, D] and ranks [B, n] (-1 = empty), n <= sink + window."""

    def __init__(self, group: StreamGroup, batch: int, dim: int, dtype, device):
        self.group = group
        self.kv = self._buffer(batch, dim, dtype, device)
        self._rank = torch.full((batch, 0), -1, dtype=torch.long, device=device)
        self.comp_k = self.comp_v = None  # sums of the evicted keys/values [B, Hg, D] (compensated groups)
        if group.compensate:  # never quantised (StreamGroup refuses the pair), so dtype is the model's
            acc = torch.promote_types(dtype, torch.float32)  # a bf16 sum of thousands of keys loses the mean
            self.comp_k = torch.zeros(batch, group.num_heads, dim, dtype=acc, device=device)
            self.comp_v = torch.zeros_like(self.comp_k)

    def _buffer(self, batch: int, dim: int, dtype, device) -> TokenBuffer:
        g = self.group
        return TokenBuffer(batch, g.num_heads, dim, dtype, device, limit=g.sink + g.window)

    def _evict(self, k: torch.Tensor, v: torch.Tensor, leaving: torch.Tensor) -> None:
        """Add the tokens of k, v [B, Hg, n, D] where leaving [B, n] to the compensation sums."""
        w = leaving.to(self.comp_k.dtype)
        self.comp_k += torch.einsum("bn,bhnd->bhd", w, k.to(self.comp_k.dtype))
        self.comp_v += torch.einsum("bn,bhnd->bhd", w, v.to(self.comp_v.dtype))

    def _evict_before(self, k: torch.Tensor, v: torch.Tensor, rank: torch.Tensor, last: torch.Tensor | int) -> None:
        """Before storing new tokens k, v [B, Hg, S, D] with ranks [B, S] up to `last` ([B, 1] or
        int): what leaves for the sums, buffered tokens and new ones that are never stored alike,
        is every token of rank sink .. last - window not summed yet (the buffer holds none older)."""
        sink, window = self.group.sink, self.group.window
        if self.size:
            self._evict(self.k, self.v, (self.rank >= sink) & (self.rank <= last - window))
        self._evict(k, v, (rank >= sink) & (rank <= last - window))

    @property
    def size(self) -> int:
        return self.kv.size

    @property
    def k(self) -> torch.Tensor:
        return self.kv.k

    @property
    def v(self) -> torch.Tensor:
        return self.kv.v

    @property
    def rank(self) -> torch.Tensor:
        return self._rank[:, : self.size]

    def _fill_to(self, n: int) -> None:
        """Slots [0, n) in use (n <= sink + window); new ones are empty (rank -1) until written."""
        if n > self.size:
            self.kv.use(min(n, self.kv.limit))
            self._match_capacity()

    def _match_capacity(self) -> None:
        if self._rank.shape[1] < self.kv.capacity:
            grown = self._rank.new_full((self._rank.shape[0], self.kv.capacity), -1)
            grown[:, : self._rank.shape[1]] = self._rank
            self._rank = grown

    def reserve(self, n: int) -> None:
        """Capacity for the tokens of n ranks (at most sink + window), allocated now."""
        self.kv.reserve_exactly(n)
        self._match_capacity()

    def commit(self, k: torch.Tensor, v: torch.Tensor, rank: torch.Tensor) -> None:
        """Store new tokens k, v: [B, Hg, S, D] with ranks [B, S] (-1 = padding)."""
        sink, window = self.group.sink, self.group.window
        last = rank.max(dim=1, keepdim=True).values
        if self.comp_k is not None:
            self._evict_before(k, v, rank, last)
        keep = (rank >= 0) & kept(rank, last, sink, window)  # only the newest `window` survive
        b, s = keep.nonzero(as_tuple=True)
        if b.numel() == 0:
            return
        self._fill_to(int(rank.max()) + 1)
        dst = ring_slot(rank[b, s], sink, window)
        self.kv.put_rows(b, dst, k.transpose(1, 2)[b, s], v.transpose(1, 2)[b, s])
        self._rank[b, dst] = rank[b, s]

    def commit_run(self, k: torch.Tensor, v: torch.Tensor, first: int) -> None:
        """New tokens with ranks first .. first + S - 1 in every row (no padding). k, v: [B, Hg, S, D]."""
        S = k.shape[2]
        sink, window = self.group.sink, self.group.window
        if S == 1:
            return self._commit_one(k, v, first)
        last = first + S - 1
        ranks = torch.arange(first, last + 1, device=k.device)
        if self.comp_k is not None:
            self._evict_before(k, v, ranks.expand(k.shape[0], S), last)
        ranks = ranks[kept(ranks, last, sink, window)]  # the newest `window` evict older ones
        self._fill_to(last + 1)
        src, dst = ranks - first, ring_slot(ranks, sink, window)
        self.kv.put(dst, k.index_select(2, src), v.index_select(2, src))
        self._rank[:, dst] = ranks

    def _commit_one(self, k: torch.Tensor, v: torch.Tensor, rank: int) -> None:
        self.kv.put(self.claim(rank), k, v)

    def claim(self, rank: int) -> int:
        """The slot of the token of `rank` in every row (no padding), made ready for it: in use,
        its rank recorded, what it evicts summed (compensated groups). The caller writes the
        token there (a decode step's ring write, in PyTorch or C)."""
        slot = ring_slot(rank, self.group.sink, self.group.window)
        if self.comp_k is not None and rank - self.group.window >= self.group.sink:
            # the ring slot holds rank - window, which leaves the window now
            self.comp_k += self.kv.k.select(2, slot).to(self.comp_k.dtype)
            self.comp_v += self.kv.v.select(2, slot).to(self.comp_v.dtype)
        self._fill_to(slot + 1)
        self._rank.select(1, slot).fill_(rank)
        return slot

    def select_batch(self, index: torch.Tensor) -> None:
        self.kv.select_batch(index)
        self._rank = self._rank[index]
        if self.comp_k is not None:
            self.comp_k, self.comp_v = self.comp_k[index], self.comp_v[index]

    @property
    def comp_nbytes(self) -> int:
        """Bytes of the compensation sums (policies/schema.compensation_bytes per head and row)."""
        return 0 if self.comp_k is None else self.comp_k.nbytes + self.comp_v.nbytes

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.comp_nbytes

    @property
    def used_nbytes(self) -> int:
        return self.kv.used_nbytes + self.comp_nbytes
