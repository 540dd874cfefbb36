"""Pass `permute_heads`: retrieval KV heads (and their query groups) first, in every layer.

For each layer whose plan is not the identity, the model adapter's `head_permutation` says
which weights to reorder and how (models.Adapter: separate q/k/v/o projections, or Phi-3's
fused qkv_proj); the pass points those weights' `get_attr` nodes at permuted copies. The layer
computes the same function; heads are just renumbered so the split ops see contiguous
[retrieval | streaming group 0 | ...] ranges. The model's own parameters are never modified.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.fx

from headpolicy.errors import ExportError
from headpolicy.passes.manager import PassContext, register_pass
from headpolicy.policies.plan import LayerPlan

log = logging.getLogger(__name__)


def match_layer(site, plan: LayerPlan):
    """The site to rewrite, or None when the plan keeps the original head order."""
    return None if plan.is_identity else site


def _weight_nodes(gm: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    nodes: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            nodes.setdefault(node.target, []).append(node)
    return nodes


def _permuted_attr(gm: torch.fx.GraphModule, target: str, index: torch.Tensor, dim: int, tag: str) -> str:
    """A new buffer holding weight `target` indexed along `dim`; returns its name."""
    old = functools.reduce(getattr, target.split("."), gm)
    name = f"hp_{tag}_{target.replace('.', '_')}"
    gm.register_buffer(name, old.detach().index_select(dim, index.to(old.device)).clone(), persistent=True)
    return name


@register_pass("permute_heads", requires={"attention_sites"}, provides={"heads_permuted"})
def permute_heads(ctx: PassContext) -> int:
    gm, layout, changed = ctx.gm, ctx.layout, 0
    weights = _weight_nodes(gm)
    for layer, site in sorted(ctx.facts["attention_sites"].items()):
        plan = ctx.plans[layer]
        if match_layer(site, plan) is None:
            continue
        attn, path = layout.modules[layer], layout.paths[layer]
        moves = layout.adapter.head_permutation(attn, plan.perm, plan.group_size, layout.head_dim)
        for name, (index, dim) in moves.items():
            target = f"{path}.{name}"
            if target not in weights:
                raise ExportError(f"permute_heads: layer {layer}: the graph reads no weight {target!r}")
            new = _permuted_attr(gm, target, index, dim, f"perm{layer}")
            for node in weights[target]:
                node.target = new
        changed += 1
        log.debug("permute_heads: layer %d order %s", layer, plan.perm)
    gm.recompile()
    return changed
