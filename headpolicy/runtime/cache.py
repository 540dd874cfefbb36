"""The split KV cache: full history for retrieval heads, sink + ring buffer for streaming heads.

Per layer (heads in the order `apply` put them):
    retrieval   keys/values [B, R, T, D]              grows with every token
    group g     sink  [B, Hg, <=sink,   D] + ranks    the first `sink` real tokens
                ring  [B, Hg, <=window, D] + ranks    the last `window` real tokens after the sink

so streaming heads hold min(T, sink + window) tokens. Buffers grow only as far as they
are filled; `kv_bytes()` sums the key/value tensors that are actually allocated.

`update()` stores the retrieval part at once but only *stages* the streaming part: which
ring slot a token takes depends on its rank among real tokens, known only from the padding
mask that the attention function receives. The attention function therefore calls
`SplitKVView.attend`, which attends and then commits the new tokens.
"""

from __future__ import annotations

import torch
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


class _Buffer:
    """A [B, H, N, D] key/value pair with ranks [B, N] (-1 = empty), grown on demand up to `cap`."""

    def __init__(self, batch: int, heads: int, dim: int, cap: int, dtype, device):
        self.k = torch.zeros(batch, heads, 0, dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.rank = torch.full((batch, 0), -1, dtype=torch.long, device=device)
        self.cap = cap

    @property
    def size(self) -> int:
        return self.k.shape[2]

    def grow(self, n: int) -> None:
        n = min(n, self.cap)
        if n <= self.size:
            return
        extra = n - self.size
        B, H, _, D = self.k.shape
        self.k = torch.cat([self.k, self.k.new_zeros(B, H, extra, D)], dim=2)
        self.v = torch.cat([self.v, self.v.new_zeros(B, H, extra, D)], dim=2)
        self.rank = torch.cat([self.rank, self.rank.new_full((B, extra), -1)], dim=1)

    def write(self, slot: torch.Tensor, sel: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank):
        """Put token s of row b (where sel[b, s]) at slot[b, s]. k, v: [B, H, S, D]."""
        b, s = sel.nonzero(as_tuple=True)
        if b.numel() == 0:
            return
        dst = slot[b, s]
        self.k.transpose(1, 2)[b, dst] = k.transpose(1, 2)[b, s]
        self.v.transpose(1, 2)[b, dst] = v.transpose(1, 2)[b, s]
        self.rank[b, dst] = rank[b, s]

    def segment(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.k, self.v, self.rank

    def select_batch(self, index: torch.Tensor) -> None:
        self.k, self.v, self.rank = self.k[index], self.v[index], self.rank[index]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class _StreamBuffers:
    def __init__(self, group: StreamGroup, batch: int, dim: int, dtype, device):
        self.group = group
        self.sink = _Buffer(batch, group.num_heads, dim, group.sink, dtype, device)
        self.ring = _Buffer(batch, group.num_heads, dim, group.window, dtype, device)

    def commit(self, k: torch.Tensor, v: torch.Tensor, rank: torch.Tensor) -> None:
        """Store new tokens k, v: [B, H, S, D] with ranks [B, S] (-1 = padding)."""
        sink, window = self.group.sink, self.group.window
        top = int(rank.max()) if rank.numel() else -1
        to_sink = (rank >= 0) & (rank < sink)
        if bool(to_sink.any()):
            self.sink.grow(top + 1)
            self.sink.write(rank, to_sink, k, v, rank)
        last = rank.max(dim=1, keepdim=True).values
        to_ring = (rank >= sink) & (rank > last - window)  # only the newest `window` survive
        if bool(to_ring.any()):
            self.ring.grow(top + 1 - sink)
            self.ring.write((rank - sink) % window, to_ring, k, v, rank)

    @property
    def nbytes(self) -> int:
        return self.sink.nbytes + self.ring.nbytes


class SplitKVLayer(CacheLayerMixin):
    """One layer of SplitKVCache (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, plan: LayerPlan):
        super().__init__()
        self.plan = plan
        self.seen = 0  # slots seen, padding included (what transformers calls the sequence length)
        self.n_real: torch.Tensor | None = None  # [B] real tokens seen per row
        self.streams: list[_StreamBuffers] = []

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, _, _, D = key_states.shape
        dtype, device = key_states.dtype, key_states.device
        self.dtype, self.device = dtype, device
        R = self.plan.num_retrieval
        self.keys = key_states.new_zeros(B, R, 0, D)
        self.values = value_states.new_zeros(B, R, 0, D)
        self.n_real = torch.zeros(B, dtype=torch.long, device=device)
        self.streams = [_StreamBuffers(g, B, D, dtype, device) for g in self.plan.groups]
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
        self.streams, self.n_real, self.seen = [], None, 0
        self.is_initialized = False

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values, self.n_real = self.keys[indices], self.values[indices], self.n_real[indices]
        for s in self.streams:
            s.sink.select_batch(indices)
            s.ring.select_batch(indices)

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
            n += s.group.num_heads * (s.sink.size + s.ring.size)
        return n


class SplitKVView:
    """What SplitKVLayer.update hands to the attention function: cache + this step's new K/V."""

    def __init__(self, layer: SplitKVLayer, key_states: torch.Tensor, value_states: torch.Tensor):
        self.layer, self.new_k, self.new_v = layer, key_states, value_states

    @property
    def shape(self):  # for code that peeks at key_states.shape
        return self.new_k.shape

    def attend(self, q: torch.Tensor, attention_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """q: [B, Hq, S, D] -> [B, Hq, S, D]; also commits the new tokens to the streaming buffers."""
        layer, plan = self.layer, self.layer.plan
        B, _, S, _ = q.shape
        T = layer.seen
        key_mask = check_key_mask(attention_mask, B, T)
        if key_mask is not None and bool(key_mask.all()):
            key_mask = None
        if key_mask is None:
            k_rank = None
            q_rank = layer.n_real[:, None] + torch.arange(S, device=q.device)[None, :]
        else:
            k_rank = token_ranks(key_mask, B, T, device=q.device)
            q_rank = k_rank[:, T - S :]
        if use_kernels(q) and (S == 1 or T == S):
            out = self._attend_kernel(q, q_rank, k_rank, key_mask, scale)
            layer.n_real = layer.n_real + (q_rank >= 0).sum(dim=1)
            return out
        G, R = plan.group_size, plan.num_retrieval
        outs = []
        if R:
            qr = q_rank if k_rank is not None else None
            outs.append(retrieval_attention(q[:, : R * G], layer.keys, layer.values, k_rank, qr, scale))
        for stream in layer.streams:
            g = stream.group
            kg, vg = self.new_k[:, g.start : g.stop], self.new_v[:, g.start : g.stop]
            idx, cand_rank = first_sink_tokens(q_rank, g.sink, min(S, g.sink))
            candidates = (gather_slots(kg, idx), gather_slots(vg, idx), cand_rank)
            local_rank = torch.where(q_rank >= g.sink, q_rank, torch.full_like(q_rank, -1))
            fixed = [stream.sink.segment(), candidates, stream.ring.segment()]
            qg = q[:, g.start * G : g.stop * G]
            outs.append(streaming_attention(qg, q_rank, fixed, (kg, vg, local_rank), g.sink, g.window, scale))
            stream.commit(kg, vg, q_rank)
        layer.n_real = layer.n_real + (q_rank >= 0).sum(dim=1)
        return torch.cat(outs, dim=1)

    def _attend_kernel(self, q, q_rank, k_rank, key_mask, scale) -> torch.Tensor:
        """Generated kernels: a fresh prefill (the cache was empty) or one decode step."""
        layer, plan = self.layer, self.layer.plan
        if q.shape[2] > 1:  # fresh prefill: every token is in new_k/new_v
            out = prefill_kernel(plan, q, self.new_k, self.new_v, key_mask, scale)
        for stream in layer.streams:
            g = stream.group
            stream.commit(self.new_k[:, g.start : g.stop], self.new_v[:, g.start : g.stop], q_rank)
        if q.shape[2] > 1:
            return out
        # Decode reads the cache after the commit: the ring slot the new token took held
        # rank q_rank - window, which the query may not attend anyway.
        from headpolicy.codegen import ops  # noqa: F401  (registers torch.ops.headpolicy.*)

        s = layer.streams
        return torch.ops.headpolicy.decode_attention(
            q, q_rank[:, 0], layer.keys, layer.values, k_rank,
            [x.sink.k for x in s], [x.sink.v for x in s], [x.sink.rank for x in s],
            [x.ring.k for x in s], [x.ring.v for x in s], [x.ring.rank for x in s],
            [x.group.sink for x in s], [x.group.window for x in s], scale,
        )  # fmt: skip


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
