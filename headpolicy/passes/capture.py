"""Capture a causal LM's prefill and decode steps as FX graphs with `torch.export`.

    prefill(input_ids [1, S])                    -> logits            (S dynamic)
    decode(input_ids [1, 1], position_ids [1, 1]) -> logits           (n = position of the token)

Both run the model without a cache (`use_cache=False`): each attention layer is one
`aten.scaled_dot_product_attention` node. `bind_cache` later gives the decode graph its
split cache as explicit inputs/outputs. The graphs come from `ExportedProgram.module()`
with the pytree calling convention removed: plain placeholders in, a flat tuple out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from headpolicy.errors import ExportError

log = logging.getLogger(__name__)

MODES = ("prefill", "decode")
MAX_LEN = 32768


class PrefillStep(nn.Module):
    def __init__(self, model: nn.Module, last_logits_only: bool):
        super().__init__()
        self.model, self.keep = model, 1 if last_logits_only else 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False, logits_to_keep=self.keep).logits


class DecodeStep(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


@dataclass
class Captured:
    gm: torch.fx.GraphModule
    mode: str
    example_args: tuple[torch.Tensor, ...]
    step: nn.Module  # the exported wrapper: the graph names modules and weights as they sit under it


def capture(model: nn.Module, mode: str, *, last_logits_only: bool = False, example_len: int = 8) -> Captured:
    """Export one step of `model` (loaded with attn_implementation="sdpa") as a flat GraphModule."""
    if mode not in MODES:
        raise ExportError(f"unknown step {mode!r}; expected one of {', '.join(MODES)}")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "sdpa":
        raise ExportError(
            f"model uses attn_implementation={impl!r}; load it with attn_implementation='sdpa' "
            "(and without headpolicy.apply) so the exported graph has sdpa nodes the passes can find"
        )
    device = next(model.parameters()).device
    if mode == "prefill":
        step = PrefillStep(model, last_logits_only)
        args = (torch.randint(0, 8, (1, example_len), device=device),)
        dynamic = ({1: torch.export.Dim("S", min=2, max=MAX_LEN)},)
    else:
        step = DecodeStep(model)
        args = (torch.zeros(1, 1, dtype=torch.long, device=device), torch.full((1, 1), example_len, device=device))
        dynamic = None
    try:
        with torch.no_grad():
            ep = torch.export.export(step.eval(), args, dynamic_shapes=dynamic)
    except Exception as e:  # torch.export raises many types; say which step failed
        raise ExportError(f"torch.export failed on the {mode} step: {' '.join(str(e).split())[:400]}") from e
    gm = flatten_calling_convention(ep.module())
    log.info("captured %s graph: %d nodes", mode, len(gm.graph.nodes))
    return Captured(gm, mode, args, step)


def flatten_calling_convention(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop the pytree in/out specs and the input guards, so passes may add inputs and outputs."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    gm.graph._codegen = torch.fx.graph.CodeGen()
    gm._forward_pre_hooks.clear()  # the input-spec check of the unlifted module
    gm.graph.eliminate_dead_code()  # so that a pass that changes nothing leaves identical code
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
