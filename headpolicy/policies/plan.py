"""Planning: resolve a policy once into per-layer head orders, streaming groups and head tables.

Running (the attention function, the cache, the kernels, the graph passes) only reads these
small frozen objects; nothing is re-planned per step.

After `apply`, each layer's KV heads sit in the order `perm`: retrieval heads first, then the
streaming heads grouped by (sink, window, compensate). `kv_rows` / `query_rows` give the projection
rows of that order, for the weights (models.Adapter) and for exported graphs (passes).

KV precision (policies/precision.py) orders heads further, so each cache part is one
contiguous head range at one precision:

    [ retrieval 16 bits | retrieval 8 bits | retrieval 4 bits | streaming groups by (bits, sink, window, compensate) ]
      num_native_retrieval  retrieval_groups (quantised)        groups (16-bit ones first)

Retrieval heads of one layer may have different bits: each quantised bits value is its own
`RetrievalGroup` (one stored tensor set each), as each (sink, window, bits, compensate) is its own
`StreamGroup`. The 16-bit retrieval heads stay the one plain part they always were.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from headpolicy.errors import QuantizedCompensationError
from headpolicy.policies.precision import DEFAULT_GROUP, DEFAULT_RESIDUAL, NATIVE_BITS
from headpolicy.policies.rule import causal_below
from headpolicy.policies.schema import HeadPolicy


@dataclass(frozen=True)
class StreamGroup:
    """Streaming KV heads [start, stop) (permuted order) that share one sink/window, KV bits and
    whether they keep a compensation token (policies/rule.py). A group is never both quantised and
    compensated (QuantizedCompensationError, as in the policy's validation)."""

    start: int
    stop: int
    sink: int
    window: int
    bits: int = NATIVE_BITS
    compensate: bool = False

    def __post_init__(self) -> None:
        if self.compensate and self.quantized:
            raise QuantizedCompensationError(
                f"streaming heads [{self.start}, {self.stop}): a compensation token on quantised heads "
                f"(kv_bits {self.bits}) is not supported; keep them at kv_bits 16 or drop compensate"
            )

    @property
    def num_heads(self) -> int:
        return self.stop - self.start

    @property
    def quantized(self) -> bool:
        return self.bits != NATIVE_BITS


@dataclass(frozen=True)
class RetrievalGroup:
    """Retrieval KV heads [start, stop) (permuted order) whose cache is quantised to `bits` (8 or 4)."""

    start: int
    stop: int
    bits: int

    @property
    def num_heads(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class LayerPlan:
    """One layer: KV head order (retrieval heads first) and the streaming groups after them.

    perm[i] is the original index of the KV head that sits at position i after `apply`.
    num_retrieval counts every retrieval head; the quantised ones are `retrieval_groups`, after
    the num_native_retrieval 16-bit ones. kv_group/kv_residual: the policy's quantisation settings.
    """

    layer: int
    perm: tuple[int, ...]
    num_retrieval: int
    groups: tuple[StreamGroup, ...]
    group_size: int  # query heads per KV head
    retrieval_groups: tuple[RetrievalGroup, ...] = ()
    kv_group: int = DEFAULT_GROUP
    kv_residual: int = DEFAULT_RESIDUAL

    @cached_property
    def num_native_retrieval(self) -> int:
        """Retrieval heads kept in the model's dtype: positions [0, num_native_retrieval)."""
        return self.num_retrieval - sum(g.num_heads for g in self.retrieval_groups)

    @cached_property
    def quantized(self) -> bool:
        """Whether any head of the layer keeps a quantised cache."""
        return bool(self.retrieval_groups) or any(g.quantized for g in self.groups)

    @cached_property
    def fully_quantized(self) -> bool:
        """Whether every head of the layer keeps a quantised cache (none in the model's dtype)."""
        return self.num_native_retrieval == 0 and all(g.quantized for g in self.groups)

    @property
    def num_kv_heads(self) -> int:
        return len(self.perm)

    @property
    def is_identity(self) -> bool:
        return self.perm == tuple(range(len(self.perm)))

    @property
    def all_retrieval(self) -> bool:
        return self.num_retrieval == self.num_kv_heads

    @cached_property
    def causal_below(self) -> int | None:
        """Queries of rank < this see every earlier key in every head of the layer (rule.causal_below
        of each streaming group), so causal attention over all heads is exact for them; None when
        every head is retrieval (always)."""
        return min((causal_below(g.sink, g.window) for g in self.groups), default=None)

    @cached_property
    def compensated(self) -> bool:
        """Whether any streaming group keeps a compensation token (a path that lacks it must refuse)."""
        return any(g.compensate for g in self.groups)

    @cached_property
    def group_sinks(self) -> tuple[int, ...]:
        return tuple(g.sink for g in self.groups)

    @cached_property
    def group_windows(self) -> tuple[int, ...]:
        return tuple(g.window for g in self.groups)

    @cached_property
    def head_table(self) -> tuple[tuple[bool, ...], tuple[int, ...], tuple[int, ...]]:
        """Per-KV-head (retrieval, sink, window) in permuted order; sink 0 / window 1 for retrieval heads."""
        retrieval = [True] * self.num_retrieval
        sink, window = [0] * self.num_retrieval, [1] * self.num_retrieval
        for g in self.groups:
            retrieval += [False] * g.num_heads
            sink += [g.sink] * g.num_heads
            window += [g.window] * g.num_heads
        return tuple(retrieval), tuple(sink), tuple(window)

    @cached_property
    def head_compensate(self) -> tuple[bool, ...]:
        """Per KV head (permuted order): whether it keeps a compensation token."""
        return (False,) * self.num_retrieval + tuple(g.compensate for g in self.groups for _ in range(g.num_heads))

    def table_tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`head_table` as tensors [Hkv]: bool, int64, int64."""
        r, s, w = self.head_table
        return (
            torch.tensor(r, dtype=torch.bool, device=device),
            torch.tensor(s, dtype=torch.long, device=device),
            torch.tensor(w, dtype=torch.long, device=device),
        )


def plan_layers(policy: HeadPolicy) -> list[LayerPlan]:
    """Retrieval heads first (16 bits, then 8, then 4; original order within), then streaming heads
    grouped by (bits, sink, window, compensate), 16-bit groups first. Without quantised heads this
    is the order of retrieval heads, then streaming heads grouped by (sink, window, compensate)."""
    plans = []
    group_size = policy.model.group_size
    for li, row in enumerate(policy.layers):
        bits = [policy.head_bits(li, h) for h in range(len(row))]
        retrieval = sorted((-bits[h], h) for h, spec in enumerate(row) if spec.is_retrieval)
        retrieval_groups: list[RetrievalGroup] = []
        for pos, (neg_bits, _) in enumerate(retrieval):
            if -neg_bits == NATIVE_BITS:
                continue
            if retrieval_groups and retrieval_groups[-1].bits == -neg_bits:
                retrieval_groups[-1] = RetrievalGroup(retrieval_groups[-1].start, pos + 1, -neg_bits)
            else:
                retrieval_groups.append(RetrievalGroup(pos, pos + 1, -neg_bits))
        streaming = sorted(
            (-bits[h], *policy.head_window(li, h), policy.head_compensates(li, h), h)
            for h, spec in enumerate(row)
            if not spec.is_retrieval
        )
        groups: list[StreamGroup] = []
        pos = len(retrieval)
        for neg_bits, sink, window, comp, _ in streaming:
            key = (sink, window, -neg_bits, comp)
            if groups and (groups[-1].sink, groups[-1].window, groups[-1].bits, groups[-1].compensate) == key:
                groups[-1] = StreamGroup(groups[-1].start, groups[-1].stop + 1, *key)
            else:
                groups.append(StreamGroup(pos, pos + 1, *key))
            pos += 1
        perm = tuple([h for _, h in retrieval] + [s[-1] for s in streaming])
        plans.append(LayerPlan(li, perm, len(retrieval), tuple(groups), group_size, tuple(retrieval_groups),
                               policy.kv_group, policy.kv_residual))  # fmt: skip
    return plans


def inverse(perm: tuple[int, ...] | list[int]) -> list[int]:
    """The permutation that undoes `perm`."""
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return out


# ---- projection rows of a head order -------------------------------------------------------------
def kv_rows(perm, head_dim: int) -> torch.Tensor:
    """Rows of a K/V projection ([Hkv * D, hidden]) in head order `perm`: int64 [Hkv * D]."""
    return (torch.tensor(list(perm))[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def query_rows(perm, group: int, head_dim: int) -> torch.Tensor:
    """Rows of the Q projection for KV head order `perm`, each KV head's query group in order
    (GQA: query head h reads KV head h // group). int64 [Hkv * group * D]."""
    return kv_rows([p * group + g for p in perm for g in range(group)], head_dim)
