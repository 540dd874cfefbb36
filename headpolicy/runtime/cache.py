"""The split KV cache: storage only. It stores and commits tokens; runtime/attention.py attends.

Per layer (KV heads in the order `apply` put them, see policies/plan.py):

    retrieval   keys/values [B, R, T, D]                  every token; grows with every step
    group g     k/v [B, Hg, <= sink + window, D]          the first `sink` real tokens, then a
                + rank [B, <= sink + window] (-1 = empty)  ring of the last `window` after them

so a streaming head holds min(T, sink + window) tokens (policies/rule.kept_tokens) in the
slot `rule.ring_slot` gives each rank. Buffers grow only as far as they are filled;
`kv_bytes()` sums the tensors actually allocated.

Quantised heads (kv_bits 8 or 4) live in runtime/quant_cache.py: `layer.qparts` (one
QuantRetrievalPart per quantised retrieval group: their tokens enter at full precision in
update() and are quantised a group at a time in commit()) and QuantStreamBuffer entries of
`layer.streams`; `layer.keys`/`layer.values` hold the 16-bit retrieval heads only.

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
from headpolicy.policies.rule import ring_slot
from headpolicy.runtime.quant_cache import QuantRetrievalPart, QuantStreamBuffer
from headpolicy.runtime.state import applied


class StreamBuffer:
    """One streaming group's tokens: k, v [B, Hg, n, D] and ranks [B, n] (-1 = empty), n <= sink + window."""

    def __init__(self, group: StreamGroup, batch: int, dim: int, dtype, device):
        self.group = group
        self.k = torch.zeros(batch, group.num_heads, 0, dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.rank = torch.full((batch, 0), -1, dtype=torch.long, device=device)

    @property
    def size(self) -> int:
        return self.k.shape[2]

    def _grow(self, n: int) -> None:
        extra = min(n, self.group.sink + self.group.window) - self.size
        if extra <= 0:
            return
        B, H, _, D = self.k.shape
        self.k = torch.cat([self.k, self.k.new_zeros(B, H, extra, D)], dim=2)
        self.v = torch.cat([self.v, self.v.new_zeros(B, H, extra, D)], dim=2)
        self.rank = torch.cat([self.rank, self.rank.new_full((B, extra), -1)], dim=1)

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
        self.k.transpose(1, 2)[b, dst] = k.transpose(1, 2)[b, s]
        self.v.transpose(1, 2)[b, dst] = v.transpose(1, 2)[b, s]
        self.rank[b, dst] = rank[b, s]

    def append(self, k: torch.Tensor, v: torch.Tensor, rank: int) -> None:
        """One new token with the same rank in every row (no padding). k, v: [B, Hg, 1, D]."""
        slot = ring_slot(rank, self.group.sink, self.group.window)
        if slot == self.size:  # still filling up
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
            self.rank = torch.cat([self.rank, self.rank.new_full((k.shape[0], 1), rank)], dim=1)
        else:
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            self.rank[:, slot] = rank

    def select_batch(self, index: torch.Tensor) -> None:
        self.k, self.v, self.rank = self.k[index], self.v[index], self.rank[index]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


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


class SplitKVLayer(CacheLayerMixin):
    """One layer of SplitKVCache (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, plan: LayerPlan):
        super().__init__()
        self.plan = plan
        self.seen = 0  # slots seen, padding included (what transformers calls the sequence length)
        self.streams: list[StreamBuffer | QuantStreamBuffer] = []
        self.qparts: list[QuantRetrievalPart] = []

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, _, _, D = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        R = self.plan.num_native_retrieval
        self.keys = key_states.new_zeros(B, R, 0, D)
        self.values = value_states.new_zeros(B, R, 0, D)
        p = self.plan
        self.streams = [QuantStreamBuffer(g, p.kv_group, B, D, self.device) if g.quantized
                        else StreamBuffer(g, B, D, self.dtype, self.device) for g in p.groups]  # fmt: skip
        self.qparts = [QuantRetrievalPart(g, p.kv_group, p.kv_residual, B, D, self.dtype, self.device)
                       for g in p.retrieval_groups]  # fmt: skip
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[SplitKVStep, SplitKVStep]:
        """key_states, value_states: [B, Hkv, S, D]. Stores the retrieval heads' part; returns the step."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        R = self.plan.num_native_retrieval
        self.keys = torch.cat([self.keys, key_states[:, :R]], dim=2)
        self.values = torch.cat([self.values, value_states[:, :R]], dim=2)
        for part in self.qparts:
            g = part.group
            part.store(key_states[:, g.start : g.stop], value_states[:, g.start : g.stop])
        self.seen += key_states.shape[2]
        step = SplitKVStep(self, key_states, value_states)
        return step, step

    def commit(self, step: SplitKVStep, q_rank: torch.Tensor | None) -> None:
        """Store the step's streaming part. q_rank: [B, S] ranks of the new tokens, or None when no
        row is padded (the new tokens then have ranks seen - S .. seen - 1 in every row)."""
        S = step.new_k.shape[2]
        for part in self.qparts:
            part.commit(q_rank)
        for stream in self.streams:
            k, v = step.group_kv(stream.group)
            if q_rank is None and S == 1:
                stream.append(k, v, self.seen - 1)
                continue
            rank = q_rank
            if rank is None:
                rank = torch.arange(self.seen - S, self.seen, device=k.device).expand(k.shape[0], S)
            stream.commit(k, v, rank)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.streams, self.qparts, self.seen = [], [], 0
        self.is_initialized = False

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = self.keys[indices], self.values[indices]
        for s in (*self.streams, *self.qparts):
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

    def kv_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes + sum(s.nbytes for s in (*self.streams, *self.qparts))

    def cached_tokens(self) -> int:
        """Tokens held summed over KV heads (row 0)."""
        if not self.is_initialized:
            return 0
        n = self.plan.num_native_retrieval * self.keys.shape[2]
        n += sum(p.group.num_heads * p.tokens for p in self.qparts)
        for s in self.streams:
            n += s.group.num_heads * s.size
        return n


def cache_argument(fn) -> str:
    """The keyword under which `fn` (a model's forward) takes a Cache: `cache` in
    current transformers, `past_key_values` (deprecated there) in earlier 5.x releases."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


class SplitKVCache(Cache):
    """A transformers Cache whose layers follow a policy's plan. Pass it to generate() or forward()."""

    def __init__(self, plans: list[LayerPlan] | tuple[LayerPlan, ...]):
        super().__init__(layers=[SplitKVLayer(p) for p in plans])

    @classmethod
    def for_model(cls, model) -> SplitKVCache:
        state = applied(model)
        if state is None:
            raise ValueError("model has no headpolicy applied; call headpolicy.apply(model, policy) first")
        return cls(state.plans)

    def kv_bytes(self) -> int:
        """Bytes of key/value tensors held right now (equal to what is allocated for them)."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def cached_tokens(self) -> int:
        return sum(layer.cached_tokens() for layer in self.layers)
