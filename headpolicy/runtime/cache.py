"""The split KV cache: full history for retrieval heads, sink + ring buffer for streaming heads.

Per layer (heads in the order `apply` put them):
    retrieval   keys/values [B, R, T, D]                  grows with every token
    group g     keys/values [B, Hg, <= sink + window, D]  the first `sink` real tokens, then a
                + ranks [B, <= sink + window]             ring of the last `window` after them

so streaming heads hold min(T, sink + window) tokens. Buffers grow only as far as they
are filled; `kv_bytes()` sums the key/value tensors that are actually allocated.

`update()` stores the retrieval part at once but only *stages* the streaming part: which
slot a token takes depends on its rank among real tokens, known only from the padding mask
that the attention function receives. The attention function therefore calls
`SplitKVView.attend`, which attends and commits the new tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from headpolicy.runtime.attention import (
    check_key_mask,
    first_sink_tokens,
    gather_slots,
    prefill_kernel,
    retrieval_attention,
    streaming_attention,
    use_kernels,
)
from headpolicy.runtime.plan import LayerPlan, StreamGroup
from headpolicy.runtime.reference import token_ranks


class _StreamWindow:
    """One streaming group's tokens: k, v [B, Hg, n, D] and ranks [B, n] (-1 = empty), n <= sink + window.

    The token of rank r lives in slot r if r < sink, else in slot sink + (r - sink) % window:
    until the buffer is full it fills in order like a dynamic cache, then its ring part wraps.
    Right after token r is committed the buffer holds exactly the keys r may attend.
    """

    def __init__(self, group: StreamGroup, batch: int, dim: int, dtype, device):
        self.group = group
        self.k = torch.zeros(batch, group.num_heads, 0, dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.rank = torch.full((batch, 0), -1, dtype=torch.long, device=device)

    @property
    def size(self) -> int:
        return self.k.shape[2]

    def slot(self, rank):
        sink, window = self.group.sink, self.group.window
        if isinstance(rank, int):
            return rank if rank < sink else sink + (rank - sink) % window
        return torch.where(rank < sink, rank, sink + (rank - sink) % window)

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
        dst = self.slot(rank[b, s])
        self.k.transpose(1, 2)[b, dst] = k.transpose(1, 2)[b, s]
        self.v.transpose(1, 2)[b, dst] = v.transpose(1, 2)[b, s]
        self.rank[b, dst] = rank[b, s]

    def append(self, k: torch.Tensor, v: torch.Tensor, rank: int) -> None:
        """Fast path: one new token with the same rank in every row (no padding). k, v: [B, Hg, 1, D]."""
        slot = self.slot(rank)
        if slot == self.size:  # still filling up
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
            self.rank = torch.cat([self.rank, self.rank.new_full((k.shape[0], 1), rank)], dim=1)
        else:
            self.k[:, :, slot] = k[:, :, 0]
            self.v[:, :, slot] = v[:, :, 0]
            self.rank[:, slot] = rank

    def segment(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.k, self.v, self.rank

    def select_batch(self, index: torch.Tensor) -> None:
        self.k, self.v, self.rank = self.k[index], self.v[index], self.rank[index]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class SplitKVLayer(CacheLayerMixin):
    """One layer of SplitKVCache (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, plan: LayerPlan):
        super().__init__()
        self.plan = plan
        self.seen = 0  # slots seen, padding included (what transformers calls the sequence length)
        self.streams: list[_StreamWindow] = []

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, _, _, D = key_states.shape
        dtype, device = key_states.dtype, key_states.device
        self.dtype, self.device = dtype, device
        R = self.plan.num_retrieval
        self.keys = key_states.new_zeros(B, R, 0, D)
        self.values = value_states.new_zeros(B, R, 0, D)
        self.streams = [_StreamWindow(g, B, D, dtype, device) for g in self.plan.groups]
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states, value_states: [B, Hkv, S, D]. Returns a view twice (as keys and values)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        R = self.plan.num_retrieval
        self.keys = torch.cat([self.keys, key_states[:, :R]], dim=2)
        self.values = torch.cat([self.values, value_states[:, :R]], dim=2)
        self.seen += key_states.shape[2]
        view = SplitKVView(self, key_states, value_states)
        return view, view

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.streams, self.seen = [], 0
        self.is_initialized = False

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = self.keys[indices], self.values[indices]
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

    def kv_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes + sum(s.nbytes for s in self.streams)

    def cached_tokens(self) -> int:
        """Tokens held summed over KV heads (row 0)."""
        if not self.is_initialized:
            return 0
        R = self.plan.num_retrieval
        n = R * self.keys.shape[2]
        for s in self.streams:
            n += s.group.num_heads * s.size
        return n

    def decode_op_args(self, q, q_rank, k_rank, scale) -> tuple:
        """Arguments of torch.ops.headpolicy.decode_attention for one step (new token committed).

        Each group's sink and ring share one buffer, passed as the ring part (ranks say which
        is which); the op's separate sink parts are empty.
        """
        s, B, D = self.streams, q.shape[0], q.shape[-1]
        empty = [self.keys.new_zeros(B, x.group.num_heads, 0, D) for x in s]
        no_rank = [x.rank[:, :0] for x in s]
        return (
            q, q_rank, self.keys, self.values, k_rank, empty, empty, no_rank,
            [x.k for x in s], [x.v for x in s], [x.rank for x in s],
            [x.group.sink for x in s], [x.group.window for x in s], scale,
        )  # fmt: skip


class SplitKVView:
    """What SplitKVLayer.update hands to the attention function: cache + this step's new K/V."""

    def __init__(self, layer: SplitKVLayer, key_states: torch.Tensor, value_states: torch.Tensor):
        self.layer, self.new_k, self.new_v = layer, key_states, value_states

    @property
    def shape(self):  # for code that peeks at key_states.shape
        return self.new_k.shape

    def new_kv(self, group: StreamGroup) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's keys and values of one streaming group's heads: [B, Hg, S, D] each."""
        return self.new_k[:, group.start : group.stop], self.new_v[:, group.start : group.stop]

    def attend(self, q: torch.Tensor, attention_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """q: [B, Hq, S, D] -> [B, Hq, S, D]; also commits the new tokens to the streaming buffers."""
        layer = self.layer
        B, _, S, _ = q.shape
        T = layer.seen
        key_mask = check_key_mask(attention_mask, B, T)
        if key_mask is not None and bool(key_mask.all()):
            key_mask = None
        if key_mask is None:  # no padding anywhere: every row has the same ranks
            k_rank = None
            q_rank = torch.arange(T - S, T, device=q.device).expand(B, S)
        else:
            k_rank = token_ranks(key_mask, B, T, device=q.device)
            q_rank = k_rank[:, T - S :]
        if use_kernels(q) and (S == 1 or T == S):
            return self._attend_kernel(q, q_rank, k_rank, key_mask, scale)
        if S == 1:
            return self._decode(q, q_rank, k_rank, scale)
        return self._prefill(q, q_rank, k_rank, scale)

    def _retrieval(self, q, q_rank, k_rank, scale) -> list[torch.Tensor]:
        layer, plan = self.layer, self.layer.plan
        R, G = plan.num_retrieval, plan.group_size
        if not R:
            return []
        qr = q_rank if k_rank is not None else None
        return [retrieval_attention(q[:, : R * G], layer.keys, layer.values, k_rank, qr, scale)]

    def _prefill(self, q, q_rank, k_rank, scale) -> torch.Tensor:
        """S > 1 new tokens: chunked local attention over [buffer, new sink tokens, new tokens], then commit."""
        G = self.layer.plan.group_size
        outs = self._retrieval(q, q_rank, k_rank, scale)
        for stream in self.layer.streams:
            g = stream.group
            kg, vg = self.new_kv(g)
            idx, cand_rank = first_sink_tokens(q_rank, g.sink, min(q.shape[2], g.sink))
            candidates = (gather_slots(kg, idx), gather_slots(vg, idx), cand_rank)
            local_rank = torch.where(q_rank >= g.sink, q_rank, torch.full_like(q_rank, -1))
            qg = q[:, g.start * G : g.stop * G]
            fixed = [stream.segment(), candidates]
            outs.append(streaming_attention(qg, q_rank, fixed, (kg, vg, local_rank), g.sink, g.window, scale))
            stream.commit(kg, vg, q_rank)
        return torch.cat(outs, dim=1)

    def _commit_step(self, q_rank, k_rank) -> None:
        """Store one new token per row: in place when no row is padded, else by rank."""
        for stream in self.layer.streams:
            g = stream.group
            kg, vg = self.new_kv(g)
            if k_rank is None:
                stream.append(kg, vg, self.layer.seen - 1)
            else:
                stream.commit(kg, vg, q_rank)

    def _decode(self, q, q_rank, k_rank, scale) -> torch.Tensor:
        """One new token: commit it, then each streaming group attends over its buffer alone.

        Without padding every buffer entry is a key the query may attend, so no mask is needed.
        """
        self._commit_step(q_rank, k_rank)
        G = self.layer.plan.group_size
        outs = self._retrieval(q, q_rank, k_rank, scale)
        for stream in self.layer.streams:
            g = stream.group
            qg = q[:, g.start * G : g.stop * G]
            if k_rank is None:
                outs.append(F.scaled_dot_product_attention(qg, stream.k, stream.v, scale=scale, enable_gqa=True))
                continue
            kr, qr = stream.rank[:, None, None, :], q_rank[:, None, :, None]
            mask = (kr >= 0) & (kr <= qr) & ((kr < g.sink) | (qr - kr < g.window))
            out = F.scaled_dot_product_attention(qg, stream.k, stream.v, attn_mask=mask, scale=scale, enable_gqa=True)
            outs.append(out.nan_to_num(0.0))
        return torch.cat(outs, dim=1)

    def _attend_kernel(self, q, q_rank, k_rank, key_mask, scale) -> torch.Tensor:
        """Generated kernels: a fresh prefill (the cache was empty) or one decode step."""
        layer = self.layer
        if q.shape[2] > 1:  # fresh prefill: every token is in new_k/new_v
            out = prefill_kernel(layer.plan, q, self.new_k, self.new_v, key_mask, scale)
            for stream in layer.streams:
                stream.commit(*self.new_kv(stream.group), q_rank)
            return out
        self._commit_step(q_rank, k_rank)
        from headpolicy.codegen import ops  # noqa: F401  (registers torch.ops.headpolicy.*)

        return torch.ops.headpolicy.decode_attention(*layer.decode_op_args(q, q_rank[:, 0], k_rank, scale))


class SplitKVCache(Cache):
    """A transformers Cache whose layers follow a policy's plan. Pass it to generate() or forward()."""

    def __init__(self, plans: list[LayerPlan]):
        super().__init__(layers=[SplitKVLayer(p) for p in plans])

    @classmethod
    def for_model(cls, model) -> SplitKVCache:
        applied = getattr(model, "_headpolicy", None)
        if applied is None:
            raise ValueError("model has no headpolicy applied; call headpolicy.apply(model, policy) first")
        return cls(applied.plans)

    def kv_bytes(self) -> int:
        """Bytes of key/value tensors held right now (equal to what is allocated for them)."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def cached_tokens(self) -> int:
        return sum(layer.cached_tokens() for layer in self.layers)
