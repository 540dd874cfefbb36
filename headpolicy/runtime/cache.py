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

Memory: each part is a `TokenBuffer` (runtime/buffers.py), preallocated and grown in blocks (`grown_capacity`):
a decode step writes its token into free capacity instead of copying the whole cache
(torch.cat), so appending costs O(1) amortised. `keys`, `values`, `k`, `v`, `rank` are views
of the slots in use. `kv_bytes()` is the capacity allocated (what the process really holds),
`kv_bytes_used()` the bytes of the tokens held (what policies/schema.kv_bytes predicts);
they are equal when the cache was `reserve`d for exactly the tokens it then got (our
generate loop reserves prompt + new tokens). A streaming buffer never grows past sink + window.

Quantised heads (kv_bits 8 or 4) live in runtime/quant_cache.py: `layer.qparts` (one
QuantRetrievalPart per quantised retrieval group: their tokens enter at full precision in
update() and are quantised a group at a time in commit()) and QuantStreamBuffer entries of
`layer.streams`; `layer.keys`/`layer.values` hold the 16-bit retrieval heads only. Their
`kv_bytes()` counts codes, scales, zero points and the full-precision residual alike; only
the residual's buffer may keep spare slots after a reserve (fewer than kv_group tokens).

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
from headpolicy.runtime.buffers import GROW_MIN, GROW_SHARE, StreamBuffer, TokenBuffer, grown_capacity
from headpolicy.runtime.quant_cache import QuantRetrievalPart, QuantStreamBuffer
from headpolicy.runtime.state import applied

__all__ = ["GROW_MIN", "GROW_SHARE", "MaskMemo", "SplitKVCache", "SplitKVLayer", "SplitKVStep", "StreamBuffer",
           "TokenBuffer", "cache_argument", "grown_capacity"]  # fmt: skip


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
        self.streams: list[StreamBuffer | QuantStreamBuffer] = []
        self.qparts: list[QuantRetrievalPart] = []
        self.reserved = 0  # tokens to allocate for at the first step (SplitKVCache.reserve)
        self.memo = memo if memo is not None else MaskMemo()  # shared by the layers of a SplitKVCache
        self.kernel_step = None  # runtime/attention.py's C decode step over these buffers (CStep), or None

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
        p = self.plan
        self.retrieval = TokenBuffer(B, p.num_native_retrieval, D, self.dtype, self.device)
        self.streams = [QuantStreamBuffer(g, p.kv_group, B, D, self.device) if g.quantized
                        else StreamBuffer(g, B, D, self.dtype, self.device) for g in p.groups]  # fmt: skip
        self.qparts = [QuantRetrievalPart(g, p.kv_group, p.kv_residual, B, D, self.dtype, self.device)
                       for g in p.retrieval_groups]  # fmt: skip
        self.is_initialized = True
        self.reserve(self.reserved)

    def reserve(self, tokens: int) -> None:
        """Allocate for `tokens` slots per row now (padding included), so no step up to there grows a buffer."""
        self.reserved = max(self.reserved, tokens)
        if not self.is_initialized:
            return
        self.retrieval.reserve_exactly(tokens)
        for s in (*self.streams, *self.qparts):
            s.reserve(tokens)

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[SplitKVStep, SplitKVStep]:
        """key_states, value_states: [B, Hkv, S, D]. Stores the retrieval heads' part; returns the step."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        R = self.plan.num_native_retrieval
        self.retrieval.append(key_states[:, :R], value_states[:, :R])
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
            if q_rank is None:
                stream.commit_run(k, v, self.seen - S)
            else:
                stream.commit(k, v, q_rank)

    def claim_token_slots(self) -> list[int]:
        """A decode step's commit without padding, but for the streaming token itself: quantised
        parts age their residual, each stream readies the slot of rank seen - 1 (StreamBuffer.claim).
        Returns the streams' slots; the caller writes the step's token there (runtime/attention.py's
        C step, or StreamBuffer.kv.put)."""
        for part in self.qparts:
            part.commit(None)
        return [stream.claim(self.seen - 1) for stream in self.streams]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.retrieval = None
        self.streams, self.qparts, self.seen = [], [], 0
        self.kernel_step = None
        self.is_initialized = False

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.retrieval.select_batch(indices)
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

    def offload(self) -> None:
        raise NotImplementedError("SplitKVCache layers cannot be offloaded")

    def kv_bytes(self) -> int:
        """Bytes allocated for keys/values (capacity included; codes, scales and residual of quantised heads)."""
        if not self.is_initialized:
            return 0
        return self.retrieval.nbytes + sum(s.nbytes for s in (*self.streams, *self.qparts))

    def kv_bytes_used(self) -> int:
        """Bytes of the key/value slots that hold tokens."""
        if not self.is_initialized:
            return 0
        return self.retrieval.used_nbytes + sum(s.used_nbytes for s in (*self.streams, *self.qparts))

    def cached_tokens(self) -> int:
        """Tokens held summed over KV heads (row 0)."""
        if not self.is_initialized:
            return 0
        n = self.plan.num_native_retrieval * self.retrieval.size
        n += sum(p.group.num_heads * p.tokens for p in self.qparts)
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
