"""Pass `permute_heads`: retrieval KV heads (and their query groups) first, in every layer.

Matches the q/k/v/o projections of each layer whose plan is not the identity and points
their `get_attr` nodes at permuted copies of the weights (rows of q/k/v and their biases,
columns of o_proj). The layer computes the same function; heads are just renumbered so
the split ops see contiguous [retrieval | streaming group 0 | ...] ranges.
The model's own parameters are never modified.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.fx

from headpolicy.errors import ExportError
from headpolicy.passes.manager import PassContext, register_pass
from headpolicy.runtime.plan import LayerPlan

log = logging.getLogger(__name__)


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def match_layer(site, plan: LayerPlan):
    """The site to rewrite, or None when the plan keeps the original head order."""
    return None if plan.is_identity else site


def _permuted_attr(gm: torch.fx.GraphModule, node: torch.fx.Node, index: torch.Tensor, dim: int, tag: str):
    """Point get_attr `node` at a new attribute holding its tensor indexed along `dim`."""
    if node.op != "get_attr":
        raise ExportError(f"permute_heads: expected a weight (get_attr), found {node.op} {node.name}")
    old = functools.reduce(getattr, node.target.split("."), gm)
    new = old.detach().index_select(dim, index.to(old.device)).clone()
    name = f"hp_{tag}_{node.target.replace('.', '_')}"
    gm.register_buffer(name, new, persistent=True)
    node.target = name


@register_pass("permute_heads", requires={"attention_sites"}, provides={"heads_permuted"})
def permute_heads(ctx: PassContext) -> int:
    gm, changed = ctx.gm, 0
    for layer, site in sorted(ctx.facts["attention_sites"].items()):
        plan = ctx.plans[layer]
        if match_layer(site, plan) is None:
            continue
        head_dim = site.projections["k_proj"].meta["val"].shape[-1] // site.num_kv_heads
        kv_rows = head_rows(list(plan.perm), head_dim)
        q_rows = head_rows([p * plan.group_size + g for p in plan.perm for g in range(plan.group_size)], head_dim)
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            lin = site.projections[proj]
            _permuted_attr(gm, lin.args[1], rows, 0, f"perm{layer}")
            if len(lin.args) > 2 and lin.args[2] is not None:
                _permuted_attr(gm, lin.args[2], rows, 0, f"perm{layer}")
        _permuted_attr(gm, site.projections["o_proj"].args[1], q_rows, 1, f"perm{layer}")
        changed += 1
        log.debug("permute_heads: layer %d order %s", layer, plan.perm)
    gm.recompile()
    return changed
