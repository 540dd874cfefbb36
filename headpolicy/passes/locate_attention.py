"""Pass `locate_attention`: bind each sdpa node to its layer and to the q/k/v it reads.

Matches `aten.scaled_dot_product_attention` whose `nn_module_stack` holds one of the model's
attention modules, as the model adapter names them (`ctx.layout`, models.Adapter: no
projection or layer names are assumed, so fused projections such as Phi-3's qkv_proj work).
k/v are traced back through transformers' GQA expansion (unsqueeze(2) -> expand -> reshape)
to the per-KV-head tensors after RoPE, which is where the cache and the split ops want them.
Changes no node; provides `attention_sites`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.fx

from headpolicy.errors import ExportError, PolicyMismatchError
from headpolicy.passes.graph_ops import SDPA
from headpolicy.passes.manager import AttentionLayout, PassContext, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten

@dataclass
class AttentionSite:
    """One attention layer in the graph. q: [B, Hq, S, D]; k, v: [B, Hkv, T, D] (not expanded)."""

    layer: int
    sdpa: torch.fx.Node
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    scale: float
    num_heads: int
    num_kv_heads: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def layer_of(node: torch.fx.Node, layout: AttentionLayout) -> int | None:
    """The layer whose attention module the node was traced in (innermost match), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        if path in layout.layer_of_path:
            return layout.layer_of_path[path]
    return None


def shape(node: torch.fx.Node) -> tuple:
    val = node.meta.get("val")
    if val is None:
        raise ExportError(f"node {node.name} has no shape metadata; locate_attention needs an exported graph")
    return tuple(val.shape)


def match_sdpa(node: torch.fx.Node) -> torch.fx.Node | None:
    return node if node.op == "call_function" and node.target == SDPA else None


def unexpand_kv(node: torch.fx.Node, num_kv_heads: int) -> torch.fx.Node | None:
    """The [B, Hkv, T, D] tensor behind transformers' repeat_kv, or the node itself if not expanded."""
    if shape(node)[1] == num_kv_heads:
        return node
    if node.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        ex = node.args[0]
        if isinstance(ex, torch.fx.Node) and ex.target == aten.expand.default:
            un = ex.args[0]
            if isinstance(un, torch.fx.Node) and un.target == aten.unsqueeze.default and un.args[1] == 2:
                src = un.args[0]
                if shape(src)[1] == num_kv_heads:
                    return src
    return None


def find_sites(gm: torch.fx.GraphModule, layout: AttentionLayout, num_kv_heads: int) -> list[AttentionSite]:
    sites = []
    for node in gm.graph.nodes:
        if match_sdpa(node) is None:
            continue
        li = layer_of(node, layout)
        if li is None:
            stack = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
            raise ExportError(f"attention node {node.name} belongs to no attention module of the model (in {stack})")
        q, k, v = node.args[:3]
        k0, v0 = unexpand_kv(k, num_kv_heads), unexpand_kv(v, num_kv_heads)
        if k0 is None or v0 is None:
            raise ExportError(
                f"layer {li}: cannot find the {num_kv_heads} KV heads behind {k.name} {shape(k)}; "
                "expected transformers' repeat_kv (unsqueeze -> expand -> reshape) or unexpanded K/V"
            )
        scale = node.kwargs.get("scale") or shape(q)[-1] ** -0.5
        sites.append(AttentionSite(li, node, q, k0, v0, float(scale), shape(q)[1], num_kv_heads))
    return sites


@register_pass("locate_attention", requires={"graph"}, provides={"attention_sites"})
def locate_attention(ctx: PassContext) -> int:
    num_kv = ctx.plans[0].num_kv_heads if ctx.plans else 0
    sites = find_sites(ctx.gm, ctx.layout, num_kv) if ctx.plans else []
    layers = [s.layer for s in sites]
    if sites and sorted(layers) != list(range(len(ctx.plans))):
        raise PolicyMismatchError(f"the graph has attention in layers {layers}, the policy has {len(ctx.plans)} layers")
    for s in sites:
        if s.num_heads != ctx.plans[s.layer].group_size * num_kv:
            raise PolicyMismatchError(
                f"layer {s.layer}: graph has {s.num_heads} query heads, policy expects "
                f"{ctx.plans[s.layer].group_size * num_kv}"
            )
    ctx.facts["attention_sites"] = {s.layer: s for s in sites}
    log.info("locate_attention: %d attention site(s)", len(sites))
    return len(sites)
