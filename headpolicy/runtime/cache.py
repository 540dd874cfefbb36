"""The split KV cache: storage only. It stores and commits tokens; runtime/attention.py attends.

Per layer (KV heads in the order `apply` put them, see policies/plan.py):

    retrieval   keys/values [B, R, T, D]                  every token
    group g     k/v [B, Hg, <= sink + window, D]          the first `sink` real tokens, then a
                + rank [B, <= sink + window] (-1 = empty)  ring of the last `window` after them

so a streaming head holds min(T, sink + window) tokens (policies/rule.kept_tokens) in the
slot `rule.ring_slot` gives each rank. A group with a compensation token (rule.py) also keeps
comp_k/comp_v [B, Hg, D]: the sums of the keys/values it evicted (tokens of rank >= sink that
left the window), added as they leave, in float32 or wider; their count is rule.dropped_count
of the newest rank, so it is not stored.

Memory: each part is a `TokenBuffer`, preallocated and grown in blocks (`grown_capacity`):
a decode step writes its token into free capacity instead of copying the whole cache
(torch.cat), so appending costs O(1) amortised. `keys`, `values`, `k`, `v`, `rank` are views
of the slots in use. `kv_bytes()` is the capacity allocated (what the process really holds),
`kv_bytes_used()` the bytes of the tokens held (what policies/schema.kv_bytes predicts);
they are equal when the cache was `reserve`d for exactly the tokens it then got (our
generate loop reserves prompt + new tokens). A streaming buffer never grows past sink + window.

One step, as transformers drives it: `SplitKVLayer.update(k, v)` stores the retrieval part
at once and returns a `SplitKVStep` (as both keys and values). Where a streaming token goes
depends on its rank among the real tokens of its row, which only the padding mask handed to
the attention function tells, so the attention function commits the streaming part with
`layer.commit(step, q_rank)`: after attending for a prefill (the queries must not see
tokens that the new ones would evict), before attending for one decode token.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from headpolicy.policies.plan import LayerPlan, StreamGroup
from headpolicy.policies.rule import kept, ring_slot
from headpolicy.runtime.state import applied

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

    def select_batch(self, index: torch.Tensor) -> None:
        self._k, self._v = self._k[index], self._v[index]

    @property
    def allocated(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value buffers [B, H, capacity, D] (what `nbytes` counts)."""
        return self._k, self._v

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
        self.kv = TokenBuffer(batch, group.num_heads, dim, dtype, device, limit=group.sink + group.window)
        self._rank = torch.full((batch, 0), -1, dtype=torch.long, device=device)
        self.comp_k = self.comp_v = None  # sums of the evicted keys/values [B, Hg, D] (compensated groups)
        if group.compensate:
            acc = torch.promote_types(dtype, torch.float32)  # a bf16 sum of thousands of keys loses the mean
            self.comp_k = torch.zeros(batch, group.num_heads, dim, dtype=acc, device=device)
            self.comp_v = torch.zeros_like(self.comp_k)

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
        slot = ring_slot(rank, self.group.sink, self.group.window)
        if self.comp_k is not None and rank - self.group.window >= self.group.sink:
            # the ring slot holds rank - window, which leaves the window now
            self.comp_k += self.kv.k.select(2, slot).to(self.comp_k.dtype)
            self.comp_v += self.kv.v.select(2, slot).to(self.comp_v.dtype)
        self._fill_to(slot + 1)
        self.kv.put(slot, k, v)
        self._rank.select(1, slot).fill_(rank)

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


@dataclass(frozen=True)
class SplitKVStep:
    """What `SplitKVLayer.update` hands the attention function, as keys and as values.

    layer: the cache layer (retrieval part already stored, streaming part not yet);
    new_k, new_v: this step's keys/values [B, Hkv, S, D], all KV heads in permuted order.
    """

    layer: SplitKVLayer
    new_k: torch.Tensor
    new_v: torch.Tensor

    @property
    def shape(self) -> torch.Size:  # for code that peeks at key_states.shape
        return self.new_k.shape

    def group_kv(self, group: StreamGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's keys and values of one streaming group's heads: [B, Hg, S, D] each."""
        return self.new_k[:, group.start : group.stop], self.new_v[:, group.start : group.stop]


class MaskMemo:
    """What the attention function worked out from one forward's padding mask, kept for the
    forward's other layers.

    transformers hands every layer of a forward the same mask tensor (built once by the mask
    function, runtime/attention.padding_mask), so the first layer derives the ranks from it and
    the others find them here: ranks are computed once per step, not once per layer.
    """

    def __init__(self):
        self._mask: torch.Tensor | None = None
        self._value = None

    def get(self, mask: torch.Tensor, build):
        """build(mask) the first time this very tensor is asked for, the stored value after."""
        if mask is not self._mask:
            self._mask, self._value = mask, build(mask)
        return self._value


class SplitKVLayer(CacheLayerMixin):
    """One layer of SplitKVCache (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, plan: LayerPlan, memo: MaskMemo | None = None):
        # CacheLayerMixin.__init__ would assign keys/values, which are views of our buffers here
        self.is_initialized = False
        self.plan = plan
        self.seen = 0  # slots seen, padding included (what transformers calls the sequence length)
        self.retrieval: TokenBuffer | None = None
        self.streams: list[StreamBuffer] = []
        self.reserved = 0  # tokens to allocate for at the first step (SplitKVCache.reserve)
        self.memo = memo if memo is not None else MaskMemo()  # shared by the layers of a SplitKVCache

    @property
    def keys(self) -> torch.Tensor | None:
        """The retrieval heads' keys [B, R, T, D] (a view of the preallocated buffer)."""
        return None if self.retrieval is None else self.retrieval.k

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.retrieval is None else self.retrieval.v

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, _, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.retrieval = TokenBuffer(B, self.plan.num_retrieval, D, self.dtype, self.device)
        self.streams = [StreamBuffer(g, B, D, self.dtype, self.device) for g in self.plan.groups]
        self.is_initialized = True
        self.reserve(self.reserved)

    def reserve(self, tokens: int) -> None:
        """Allocate for `tokens` slots per row now (padding included), so no step up to there grows a buffer."""
        self.reserved = max(self.reserved, tokens)
        if not self.is_initialized:
            return
        self.retrieval.reserve_exactly(tokens)
        for s in self.streams:
            s.reserve(tokens)

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[SplitKVStep, SplitKVStep]:
        """key_states, value_states: [B, Hkv, S, D]. Stores the retrieval heads' part; returns the step."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        R = self.plan.num_retrieval
        self.retrieval.append(key_states[:, :R], value_states[:, :R])
        self.seen += key_states.shape[2]
        step = SplitKVStep(self, key_states, value_states)
        return step, step

    def commit(self, step: SplitKVStep, q_rank: torch.Tensor | None) -> None:
        """Store the step's streaming part. q_rank: [B, S] ranks of the new tokens, or None when no
        row is padded (the new tokens then have ranks seen - S .. seen - 1 in every row)."""
        S = step.new_k.shape[2]
        for stream in self.streams:
            k, v = step.group_kv(stream.group)
            if q_rank is None:
                stream.commit_run(k, v, self.seen - S)
            else:
                stream.commit(k, v, q_rank)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.retrieval = None
        self.streams, self.seen = [], 0
        self.is_initialized = False

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.retrieval.select_batch(indices)
        for s in self.streams:
            s.select_batch(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            B = self.keys.shape[0]
            self.batch_select_indices(torch.arange(B, device=self.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "SplitKVCache cannot be cropped: streaming heads have already dropped old tokens "
            "(assisted/speculative decoding is not supported)"
        )

    def offload(self) -> None:
        raise NotImplementedError("SplitKVCache layers cannot be offloaded")

    def kv_bytes(self) -> int:
        """Bytes allocated for keys/values (capacity included)."""
        if not self.is_initialized:
            return 0
        return self.retrieval.nbytes + sum(s.nbytes for s in self.streams)

    def kv_bytes_used(self) -> int:
        """Bytes of the key/value slots that hold tokens."""
        if not self.is_initialized:
            return 0
        return self.retrieval.used_nbytes + sum(s.used_nbytes for s in self.streams)

    def cached_tokens(self) -> int:
        """Tokens held summed over KV heads (row 0)."""
        if not self.is_initialized:
            return 0
        n = self.plan.num_retrieval * self.retrieval.size
        for s in self.streams:
            n += s.group.num_heads * (s.size + s.group.compensate)  # a compensation token counts as one
        return n


def cache_argument(fn) -> str:
    """The keyword under which `fn` (a model's forward) takes a Cache: `cache` in
    current transformers, `past_key_values` (deprecated there) in earlier 5.x releases."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


class SplitKVCache(Cache):
    """A transformers Cache whose layers follow a policy's plan. Pass it to generate() or forward()."""

    def __init__(self, plans: list[LayerPlan] | tuple[LayerPlan, ...]):
        memo = MaskMemo()
        super().__init__(layers=[SplitKVLayer(p, memo) for p in plans])

    @classmethod
    def for_model(cls, model) -> SplitKVCache:
        state = applied(model)
        if state is None:
            raise ValueError("model has no headpolicy applied; call headpolicy.apply(model, policy) first")
        return cls(state.plans)

    def reserve(self, tokens: int) -> SplitKVCache:
        """Allocate every layer for `tokens` slots per row (prompt, padding included, + new tokens)
        up front, as a static cache would: no step up to there grows a buffer, and the capacity
        is exactly what those tokens need (streaming buffers: at most sink + window)."""
        for layer in self.layers:
            layer.reserve(tokens)
        return self

    def kv_bytes(self) -> int:
        """Bytes allocated for key/value tensors, spare capacity included (what the process holds)."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def kv_bytes_used(self) -> int:
        """Bytes of the key/value slots that hold tokens (what policies/schema.HeadPolicy.kv_bytes predicts)."""
        return sum(layer.kv_bytes_used() for layer in self.layers)

    def cached_tokens(self) -> int:
        return sum(layer.cached_tokens() for layer in self.layers)
