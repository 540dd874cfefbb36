"""Pass `bind_cache`: give the step graph its split KV cache as explicit tensors (layout.py).

prefill: adds outputs. Per layer, the retrieval part k[:, :R] / v[:, :R] ([B, R, S, D]) and
         per streaming group its sink + ring slots, `ring_fill(k[:, g])` ([B, Hg, sink+window, D]).
decode:  adds inputs with the same names and shapes as prefill's outputs (retrieval length T),
         and outputs the updated parts: retrieval `append(past, new)` (T + 1) and streaming
         `ring_write(past, new, n)` (same size). The ops are rebound to those tensors with
         q_pos = n and the slot positions derived from n; a layer left on sdpa attends over
         append(past, new) unmasked (one query at the end sees every key).
Changes nothing on a graph without attention sites. Provides `cache_spec`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx

from headpolicy.passes import layout
from headpolicy.passes.graph_ops import SDPA
from headpolicy.passes.manager import PassContext, register_pass
from headpolicy.passes.split_attention import SplitSite
from headpolicy.policies.plan import StreamGroup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheEntry:
    """One cached K/V pair. length None: grows (retrieval); else fixed sink + window slots."""

    layer: int
    part: str  # "r" (retrieval) or "s0", "s1"... (streaming group)
    heads: int
    sink: int | None = None
    window: int | None = None

    @property
    def length(self) -> int | None:
        return None if self.sink is None else self.sink + self.window

    def name(self, kind: str) -> str:
        return f"l{self.layer}_{self.part}_{kind}"


def match_site(split: SplitSite) -> SplitSite | None:
    return split if (split.split or split.site.sdpa.target == SDPA) else None


class _Binder:
    """Surgery helpers: one per cache part. `decode` adds past inputs; both modes collect outputs."""

    def __init__(self, graph: torch.fx.Graph, decode: bool):
        self.graph, self.decode = graph, decode
        self.spec: list[CacheEntry] = []
        self.outputs: list[torch.fx.Node] = []
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.last_input = placeholders[-1]
        self.n_pos = self.count = None  # decode: the new token's position n, and n + 1 tokens seen
        if decode:
            pos_ids = next(p for p in placeholders if p.name == "position_ids")
            with graph.inserting_after(self.last_input):  # cache placeholders are inserted before it
                self.n_pos = graph.call_function(layout.step_position, (pos_ids,))
            with graph.inserting_after(self.n_pos):
                self.count = graph.call_function(torch.add, (self.n_pos, 1))

    def past(self, entry: CacheEntry) -> tuple[torch.fx.Node, torch.fx.Node]:
        self.spec.append(entry)
        if not self.decode:
            return None, None
        pair = []
        for kind in ("key", "value"):
            with self.graph.inserting_after(self.last_input):
                self.last_input = self.graph.placeholder("past_" + entry.name(kind))
            pair.append(self.last_input)
        return tuple(pair)

    def native(self, layer: int, split: SplitSite) -> None:
        """A layer left on sdpa: all heads form one retrieval part."""
        site, plan = split.site, split.plan
        pk, pv = self.past(CacheEntry(layer, "r", plan.num_kv_heads))
        k, v = site.k, site.v
        if self.decode:
            with self.graph.inserting_before(site.sdpa):
                k = self.graph.call_function(layout.append, (pk, k))
                v = self.graph.call_function(layout.append, (pv, v))
                ke = self.graph.call_function(layout.expand_kv, (k, plan.group_size))
                ve = self.graph.call_function(layout.expand_kv, (v, plan.group_size))
            site.sdpa.args, site.sdpa.kwargs = (site.q, ke, ve), {"scale": site.scale}  # one query: no mask
        self.outputs += [k, v]

    def retrieval(self, layer: int, op: torch.fx.Node, heads: int) -> None:
        pk, pv = self.past(CacheEntry(layer, "r", heads))
        k, v = op.args[1], op.args[2]
        if self.decode:
            with self.graph.inserting_before(op):
                k = self.graph.call_function(layout.append, (pk, k))
                v = self.graph.call_function(layout.append, (pv, v))
                k_pos = self.graph.call_function(layout.positions, (k,))
            op.args = (op.args[0], k, v, self.n_pos, k_pos, *op.args[5:])
        self.outputs += [k, v]

    def stream(self, layer: int, index: int, g: StreamGroup, op: torch.fx.Node) -> None:
        pk, pv = self.past(CacheEntry(layer, f"s{index}", g.num_heads, g.sink, g.window))
        k, v = op.args[1], op.args[2]
        with self.graph.inserting_before(op):
            if self.decode:
                k = self.graph.call_function(layout.ring_write, (pk, k, self.n_pos, g.sink, g.window))
                v = self.graph.call_function(layout.ring_write, (pv, v, self.n_pos, g.sink, g.window))
                k_pos = self.graph.call_function(layout.slot_positions, (self.count, g.sink, g.window))
                op.args = (op.args[0], k, v, self.n_pos, k_pos, *op.args[5:])
            else:
                k = self.graph.call_function(layout.ring_fill, (k, g.sink, g.window))
                v = self.graph.call_function(layout.ring_fill, (v, g.sink, g.window))
        self.outputs += [k, v]


@register_pass("bind_cache", requires={"attention_split"}, provides={"cache_spec"})
def bind_cache(ctx: PassContext) -> int:
    splits = [(layer, s) for layer, s in sorted(ctx.facts["attention_split"].items()) if match_site(s) is not None]
    if not splits:
        ctx.facts["cache_spec"] = []
        return 0
    graph = ctx.gm.graph
    binder = _Binder(graph, decode=ctx.mode == "decode")
    for layer, split in splits:
        if not split.split:
            binder.native(layer, split)
            continue
        if split.retrieval is not None:
            binder.retrieval(layer, split.retrieval, split.plan.num_retrieval)
        for index, (g, op) in enumerate(split.streams):
            binder.stream(layer, index, g, op)
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    (results,) = out.args
    out.args = (tuple(results) + tuple(binder.outputs),)
    graph.eliminate_dead_code()
    ctx.gm.recompile()
    ctx.facts["cache_spec"] = binder.spec
    log.info("bind_cache: %d layer(s), %d cache tensors (%s)", len(splits), 2 * len(binder.spec), ctx.mode)
    return len(splits)
