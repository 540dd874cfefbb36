"""Planning: resolve a policy once into per-layer head orders and streaming groups.

Running (the attention function, the cache) only reads these small frozen objects.
"""

from __future__ import annotations

from dataclasses import dataclass

from headpolicy.policies.schema import HeadPolicy


@dataclass(frozen=True)
class StreamGroup:
    """Streaming KV heads [start, stop) (permuted order) that share one sink/window."""

    start: int
    stop: int
    sink: int
    window: int

    @property
    def num_heads(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class LayerPlan:
    """One layer: KV head order (retrieval heads first) and the streaming groups after them.

    perm[i] is the original index of the KV head that sits at position i after `apply`.
    """

    layer: int
    perm: tuple[int, ...]
    num_retrieval: int
    groups: tuple[StreamGroup, ...]
    group_size: int  # query heads per KV head

    @property
    def num_kv_heads(self) -> int:
        return len(self.perm)

    @property
    def is_identity(self) -> bool:
        return self.perm == tuple(range(len(self.perm)))

    @property
    def all_retrieval(self) -> bool:
        return self.num_retrieval == self.num_kv_heads


def plan_layers(policy: HeadPolicy) -> list[LayerPlan]:
    """Retrieval heads first (original order), then streaming heads grouped by (sink, window)."""
    plans = []
    group_size = policy.model.group_size
    for li, row in enumerate(policy.layers):
        retrieval = [h for h, spec in enumerate(row) if spec.is_retrieval]
        streaming = sorted((policy.head_window(li, h) + (h,) for h, spec in enumerate(row) if not spec.is_retrieval))
        groups: list[StreamGroup] = []
        pos = len(retrieval)
        for sink, window, _ in streaming:
            if groups and (groups[-1].sink, groups[-1].window) == (sink, window):
                last = groups[-1]
                groups[-1] = StreamGroup(last.start, last.stop + 1, sink, window)
            else:
                groups.append(StreamGroup(pos, pos + 1, sink, window))
            pos += 1
        perm = tuple(retrieval + [h for _, _, h in streaming])
        plans.append(LayerPlan(li, perm, len(retrieval), tuple(groups), group_size))
    return plans
