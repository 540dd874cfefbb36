"""What `apply` leaves on a model, and the one accessor for it.

No other module reads these attributes: ask `applied(model)` / `applied_policy(model)` for
the model, `layer_plan(attn)` for an attention module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from headpolicy.models import Adapter
from headpolicy.policies.plan import LayerPlan
from headpolicy.policies.schema import HeadPolicy, ModelInfo

_MODEL_ATTR = "_headpolicy"
_LAYER_ATTR = "headpolicy_plan"


@dataclass(frozen=True)
class AppliedPolicy:
    """A model's applied policy: its per-layer plans (built once) and what `apply` changed."""

    policy: HeadPolicy
    plans: tuple[LayerPlan, ...]
    info: ModelInfo  # taken before the weights were permuted
    adapter: Adapter
    previous_attn_implementation: str


def applied(model: nn.Module) -> AppliedPolicy | None:
    """The AppliedPolicy `apply` attached to `model`, or None for an unmodified model."""
    return getattr(model, _MODEL_ATTR, None)


def applied_policy(model: nn.Module) -> HeadPolicy | None:
    """The policy applied to `model`, or None."""
    state = applied(model)
    return None if state is None else state.policy


def attach_state(model: nn.Module, state: AppliedPolicy) -> None:
    """Record `state` on the model and each attention module's plan on that module (apply only)."""
    for attn, plan in zip(state.adapter.attention_modules(model), state.plans, strict=True):
        set_layer_plan(attn, plan)
    setattr(model, _MODEL_ATTR, state)


def set_layer_plan(attn: nn.Module, plan: LayerPlan) -> None:
    """Give one attention module its plan (what the headpolicy attention function reads)."""
    setattr(attn, _LAYER_ATTR, plan)


def layer_plan(attn: nn.Module) -> LayerPlan:
    """The plan of one attention module of an applied model."""
    plan = getattr(attn, _LAYER_ATTR, None)
    if plan is None:
        raise ValueError(
            f"{type(attn).__name__} has no headpolicy plan: the headpolicy attention function runs only "
            "in a model that headpolicy.apply(model, policy) prepared"
        )
    return plan
