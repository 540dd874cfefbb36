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
from headpolicy.passes.manager import PassContext, register_pass
from headpolicy.passes.ops import SDPA
from headpolicy.passes.split_attention import SplitSite

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


def _placeholder_after(graph: torch.fx.Graph, after: torch.fx.Node, name: str) -> torch.fx.Node:
    with graph.inserting_after(after):
        return graph.placeholder(name)


def _set_arg(node: torch.fx.Node, index: int, value) -> None:
    args = list(node.args)
    args[index] = value
    node.args = tuple(args)


@register_pass("bind_cache", requires={"attention_split"}, provides={"cache_spec"})
def bind_cache(ctx: PassContext) -> int:
    graph = ctx.gm.graph
    spec: list[CacheEntry] = []
    outputs: list[torch.fx.Node] = []
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    last_input = placeholders[-1]
    n_pos = count = None  # decode: the new token's position n, and n + 1 tokens seen
    if ctx.mode == "decode" and ctx.facts["attention_split"]:
        pos_ids = next(p for p in placeholders if p.name == "position_ids")
        with graph.inserting_after(last_input):  # cache placeholders are inserted before it
            n_pos = graph.call_function(layout.step_position, (pos_ids,))
    changed = 0

    def cache_input(entry: CacheEntry, kind: str) -> torch.fx.Node:
        nonlocal last_input
        last_input = _placeholder_after(graph, last_input, "past_" + entry.name(kind))
        return last_input

    for layer, split in sorted(ctx.facts["attention_split"].items()):
        if match_site(split) is None:
            continue
        site, plan, changed = split.site, split.plan, changed + 1
        if not split.split:  # native sdpa over every head: the whole layer is a retrieval part
            entry = CacheEntry(layer, "r", plan.num_kv_heads)
            spec.append(entry)
            k, v = site.k, site.v
            if ctx.mode == "decode":
                pk, pv = cache_input(entry, "key"), cache_input(entry, "value")
                with graph.inserting_before(site.sdpa):
                    k = graph.call_function(layout.append, (pk, site.k))
                    v = graph.call_function(layout.append, (pv, site.v))
                    ke = graph.call_function(layout.expand_kv, (k, plan.group_size))
                    ve = graph.call_function(layout.expand_kv, (v, plan.group_size))
                site.sdpa.args = (site.q, ke, ve)
                site.sdpa.kwargs = {"scale": site.scale}
            outputs += [k, v]
            continue
        if split.retrieval is not None:
            entry = CacheEntry(layer, "r", plan.num_retrieval)
            spec.append(entry)
            op = split.retrieval
            k, v = op.args[1], op.args[2]
            if ctx.mode == "decode":
                pk, pv = cache_input(entry, "key"), cache_input(entry, "value")
                with graph.inserting_before(op):
                    k = graph.call_function(layout.append, (pk, k))
                    v = graph.call_function(layout.append, (pv, v))
                    k_pos = graph.call_function(layout.positions, (k,))
                op.args = (op.args[0], k, v, n_pos, k_pos, *op.args[5:])
            outputs += [k, v]
        for gi, (g, op) in enumerate(split.streams):
            entry = CacheEntry(layer, f"s{gi}", g.num_heads, g.sink, g.window)
            spec.append(entry)
            k, v = op.args[1], op.args[2]
            with graph.inserting_before(op):
                if ctx.mode == "decode":
                    pk, pv = cache_input(entry, "key"), cache_input(entry, "value")
                    if count is None:
                        count = graph.call_function(torch.add, (n_pos, 1))
                    k = graph.call_function(layout.ring_write, (pk, k, n_pos, g.sink, g.window))
                    v = graph.call_function(layout.ring_write, (pv, v, n_pos, g.sink, g.window))
                    k_pos = graph.call_function(layout.slot_positions, (count, g.sink, g.window))
                    op.args = (op.args[0], k, v, n_pos, k_pos, *op.args[5:])
                else:
                    k = graph.call_function(layout.ring_fill, (k, g.sink, g.window))
                    v = graph.call_function(layout.ring_fill, (v, g.sink, g.window))
            outputs += [k, v]

    if changed:
        out = next(n for n in reversed(graph.nodes) if n.op == "output")
        (results,) = out.args
        out.args = (tuple(results) + tuple(outputs),)
        graph.eliminate_dead_code()
        ctx.gm.recompile()
    ctx.facts["cache_spec"] = spec
    log.info("bind_cache: %d layer(s), %d cache tensors (%s)", changed, 2 * len(spec), ctx.mode)
    return changed
