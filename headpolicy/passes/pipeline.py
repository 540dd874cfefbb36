"""Capture a step, run the headpolicy passes on it, export the result (pt2 or ONNX).

step = compile_step(model, policy, "decode")   # rewritten GraphModule + cache spec
step.gm(input_ids, position_ids, *past)        # -> (logits, *present)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from headpolicy.errors import ExportError, QuantizedExportError, UnsupportedPolicyError
from headpolicy.models import describe_model, get_adapter
from headpolicy.passes import bind_cache, locate_attention, permute_heads, split_attention  # noqa: F401 (register)
from headpolicy.passes.bind_cache import CacheEntry
from headpolicy.passes.capture import MAX_LEN, Captured, capture
from headpolicy.passes.manager import AttentionLayout, PassContext, run_passes
from headpolicy.policies.plan import plan_layers
from headpolicy.policies.schema import HeadPolicy

log = logging.getLogger(__name__)

DEFAULT_PASSES = ("locate_attention", "permute_heads", "split_attention", "bind_cache")


@dataclass
class CompiledStep:
    """A rewritten step graph. Inputs: input_ids (+ position_ids, past cache for decode);
    outputs: (logits, *present) in `cache` order, key then value per entry."""

    gm: torch.fx.GraphModule
    mode: str
    cache: list[CacheEntry]
    counts: dict[str, int]
    num_layers: int
    head_dim: int

    def input_names(self) -> list[str]:
        if self.mode == "prefill":
            return ["input_ids"]
        return ["input_ids", "position_ids"] + [f"past_{e.name(k)}" for e in self.cache for k in ("key", "value")]

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present_{e.name(k)}" for e in self.cache for k in ("key", "value")]

    def empty_cache(self, length: int, batch: int = 1, dtype=torch.float32, device="cpu") -> list[torch.Tensor]:
        """Zero past tensors with `length` retrieval tokens (to trace or warm up a decode step)."""
        out = []
        for e in self.cache:
            n = length if e.length is None else e.length
            # two tensors, not one twice: export would treat aliased inputs as one
            out += [torch.zeros(batch, e.heads, n, self.head_dim, dtype=dtype, device=device) for _ in range(2)]
        return out

    def example_args(self, length: int = 8) -> tuple[torch.Tensor, ...]:
        if self.mode == "prefill":
            return (torch.zeros(1, length, dtype=torch.long),)
        ids, pos = torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), length, dtype=torch.long)
        return (ids, pos, *self.empty_cache(length))

    def dynamic_shapes(self) -> tuple:
        if self.mode == "prefill":
            return ({1: torch.export.Dim("S", min=2, max=MAX_LEN)},)
        T = torch.export.Dim.DYNAMIC
        past = [{2: T} if e.length is None else None for e in self.cache for _ in range(2)]
        return (None, None, *past)


def compile_step(
    model: nn.Module,
    policy: HeadPolicy,
    mode: str,
    *,
    passes=DEFAULT_PASSES,
    skip_noop: bool = True,
    last_logits_only: bool = False,
    check_fingerprint: bool = True,
) -> CompiledStep:
    """Capture `model`'s `mode` step and rewrite it for `policy` (the model itself is not modified)."""
    info = describe_model(model)
    policy.check_model(info, check_fingerprint=check_fingerprint)
    refuse_quantized(policy)
    refuse_compensation(policy)
    cap = capture(model, mode, last_logits_only=last_logits_only)
    ctx = pass_context(cap, model, policy, skip_noop=skip_noop)
    with torch.no_grad():
        run_passes(ctx, passes)
    for mod in ctx.gm.modules():  # an unlifted ExportedProgram module refuses .eval()
        mod.training = False
    if "locate_attention" in passes and not ctx.facts.get("attention_sites"):
        raise ExportError("no attention layer found in the exported graph (is the model loaded with sdpa?)")
    return CompiledStep(
        ctx.gm, mode, list(ctx.facts.get("cache_spec", [])), dict(ctx.counts), info.num_layers, info.head_dim
    )


def refuse_quantized(policy: HeadPolicy) -> None:
    """Exported graphs keep every cache part in the model's dtype: their cache inputs and outputs
    are plain k/v tensors, and quantising a token as it ages out of the residual would need the
    group bookkeeping of runtime/quant_cache.py inside the graph. A quantised policy is refused
    rather than exported at a precision it does not ask for."""
    if policy.num_quantized:
        raise QuantizedExportError(
            f"policy stores {policy.num_quantized} of {policy.num_heads} KV heads quantised (kv_bits 8/4); "
            "export (pt2, onnx) carries native-precision heads only: compile with --precision native "
            "or set kv_bits: 16 to export it"
        )


def refuse_compensation(policy: HeadPolicy) -> None:
    """Exported graphs (pt2, ONNX) have no compensation token: their streaming ops and cache
    layout hold only the sink and the ring. Refused before anything is captured."""
    if policy.num_compensated:
        raise UnsupportedPolicyError(
            f"the policy gives {policy.num_compensated} streaming heads a compensation token, which exported "
            "graphs (pt2, ONNX) do not implement; export a policy without compensate, or run it with apply()"
        )


def pass_context(cap: Captured, model: nn.Module, policy: HeadPolicy, *, skip_noop: bool = True) -> PassContext:
    """The context passes run in: the captured graph, the policy's plans, the model's attention layout."""
    layout = AttentionLayout.of(cap.step, model, get_adapter(model), policy.model.head_dim)
    return PassContext(cap.gm, cap.mode, tuple(plan_layers(policy)), layout=layout, skip_noop=skip_noop)


def export_program(step: CompiledStep) -> torch.export.ExportedProgram:
    """Re-export a rewritten step so it can be saved (`torch.export.save`) or lowered."""
    try:
        with torch.no_grad():
            return torch.export.export(step.gm, step.example_args(), dynamic_shapes=step.dynamic_shapes())
    except Exception as e:
        raise ExportError(
            f"re-exporting the rewritten {step.mode} graph failed: {' '.join(str(e).split())[:400]}"
        ) from e
