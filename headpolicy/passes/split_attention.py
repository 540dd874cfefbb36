"""Pass `split_attention`: replace each layer's sdpa with headpolicy retrieval/streaming ops.

After `permute_heads`, a layer's KV heads are [retrieval | streaming group 0 | ...], so

    sdpa(q, repeat_kv(k), repeat_kv(v))
 -> cat([retrieval_attention(q[:, :R*G], k[:, :R], v[:, :R], q_pos, k_pos),
         streaming_attention(q[:, g*G], k[:, g], v[:, g], q_pos, k_pos, sink_g, window_g), ...], dim=1)

with positions 0..T-1 (the captured step has no cache; `bind_cache` rebinds K/V and
positions to the split cache for decode). The sdpa's own mask is dropped: the ops compute
the causal + sink/window rule from positions, for one unpadded sequence per batch row.
With `skip_noop`, layers whose heads are all retrieval keep their native sdpa.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.fx

from headpolicy.passes import layout
from headpolicy.passes.graph_ops import RETRIEVAL_OP, STREAMING_OP
from headpolicy.passes.locate_attention import AttentionSite
from headpolicy.passes.manager import PassContext, register_pass
from headpolicy.policies.plan import LayerPlan, StreamGroup

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass
class SplitSite:
    """A rewritten layer: the op nodes and the q/k/v slices and positions they read."""

    site: AttentionSite
    plan: LayerPlan
    q_pos: torch.fx.Node | None = None
    retrieval: torch.fx.Node | None = None  # the retrieval op, None when R == 0
    streams: list[tuple[StreamGroup, torch.fx.Node]] = field(default_factory=list)

    @property
    def split(self) -> bool:
        return self.q_pos is not None


def match_layer(site: AttentionSite, plan: LayerPlan, skip_noop: bool) -> AttentionSite | None:
    """The site to split, or None for an all-retrieval layer when no-op layers are skipped."""
    return None if (skip_noop and plan.all_retrieval) else site


def _heads(graph: torch.fx.Graph, x: torch.fx.Node, start: int, stop: int) -> torch.fx.Node:
    return graph.call_function(aten.slice.Tensor, (x, 1, start, stop))


def rewrite(graph: torch.fx.Graph, site: AttentionSite, plan: LayerPlan) -> SplitSite:
    G, R = plan.group_size, plan.num_retrieval
    out = SplitSite(site, plan)
    with graph.inserting_before(site.sdpa):
        out.q_pos = graph.call_function(layout.positions, (site.q,))
        k_pos = graph.call_function(layout.positions, (site.k,))
        parts = []
        if R:
            q, k, v = (_heads(graph, x, 0, R * n) for x, n in ((site.q, G), (site.k, 1), (site.v, 1)))
            out.retrieval = graph.call_function(RETRIEVAL_OP, (q, k, v, out.q_pos, k_pos, site.scale))
            parts.append(out.retrieval)
        for g in plan.groups:
            q = _heads(graph, site.q, g.start * G, g.stop * G)
            k, v = _heads(graph, site.k, g.start, g.stop), _heads(graph, site.v, g.start, g.stop)
            op = graph.call_function(STREAMING_OP, (q, k, v, out.q_pos, k_pos, g.sink, g.window, site.scale))
            out.streams.append((g, op))
            parts.append(op)
        merged = graph.call_function(aten.cat.default, (parts, 1)) if len(parts) > 1 else parts[0]
    merged.meta["val"] = site.sdpa.meta.get("val")
    site.sdpa.replace_all_uses_with(merged)
    graph.erase_node(site.sdpa)
    site.sdpa = merged
    return out


@register_pass("split_attention", requires={"attention_sites", "heads_permuted"}, provides={"attention_split"})
def split_attention(ctx: PassContext) -> int:
    graph, changed, splits = ctx.gm.graph, 0, {}
    for layer, site in sorted(ctx.facts["attention_sites"].items()):
        plan = ctx.plans[layer]
        if match_layer(site, plan, ctx.skip_noop) is None:
            splits[layer] = SplitSite(site, plan)
            continue
        splits[layer] = rewrite(graph, site, plan)
        changed += 1
        log.debug(
            "split_attention: layer %d -> %d retrieval + %d streaming group(s)",
            layer,
            plan.num_retrieval,
            len(plan.groups),
        )
    ctx.facts["attention_split"] = splits
    if changed:
        graph.eliminate_dead_code()
        ctx.gm.recompile()
    return changed
