"""`apply(model, policy)`: load a policy into a transformers model, in place.

1. check the policy was made for this model (shape, fingerprint);
2. permute each layer's q/k/v/o projections so retrieval KV heads (with their query
   groups) come first: the split cache then stores contiguous head ranges;
3. switch the model to the `headpolicy` attention function (transformers' AttentionInterface);
4. make `model.generate()` use a SplitKVCache unless it is given another cache, and
   `model.save_pretrained()` write the original head order plus `head_policy.yaml`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from torch import nn

from headpolicy.checkpoint import install_save_hook
from headpolicy.errors import AlreadyAppliedError
from headpolicy.models import Adapter, describe_model, get_adapter
from headpolicy.policies.schema import HeadPolicy, ModelInfo
from headpolicy.runtime.attention import ATTN_NAME
from headpolicy.runtime.cache import SplitKVCache
from headpolicy.runtime.plan import LayerPlan, plan_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppliedPolicy:
    """What `apply` leaves on the model as `model._headpolicy`."""

    policy: HeadPolicy
    plans: tuple[LayerPlan, ...]
    info: ModelInfo  # taken before the weights were permuted
    adapter: Adapter
    previous_attn_implementation: str


def apply(model: nn.Module, policy: HeadPolicy, *, check_fingerprint: bool = True) -> nn.Module:
    """Apply `policy` to `model` in place and return it.

    Raises PolicyMismatchError if the policy is for another model (pass
    check_fingerprint=False to accept a policy for the same shape but other weights), and
    AlreadyAppliedError if the model already carries a policy.
    """
    if getattr(model, "_headpolicy", None) is not None:
        raise AlreadyAppliedError(
            "this model already has a headpolicy applied; load a fresh model to apply another policy"
        )
    adapter = get_adapter(model)
    info = describe_model(model)
    policy.check_model(info, check_fingerprint=check_fingerprint)

    plans = tuple(plan_layers(policy))
    _, _, _, head_dim = adapter.head_counts(model)
    for attn, plan in zip(adapter.attention_modules(model), plans, strict=True):
        if not plan.is_identity:
            adapter.permute_kv_heads(attn, list(plan.perm), plan.group_size, head_dim)
        attn.headpolicy_plan = plan

    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    model._headpolicy = AppliedPolicy(policy, plans, info, adapter, previous)
    _default_split_cache(model)
    install_save_hook(model)
    log.info(
        "headpolicy: %d/%d KV heads retrieval, sink %d, window %d",
        policy.num_retrieval,
        policy.num_heads,
        policy.sink,
        policy.window,
    )
    return model


def applied_policy(model: nn.Module) -> HeadPolicy | None:
    applied = getattr(model, "_headpolicy", None)
    return None if applied is None else applied.policy


def _default_split_cache(model: nn.Module) -> None:
    """generate() gets a fresh SplitKVCache unless the caller passes a cache or disables caching."""
    generate = model.generate

    @functools.wraps(generate)
    def generate_with_split_cache(*args, **kwargs):
        wants_cache = kwargs.get("use_cache", True) and "cache_implementation" not in kwargs
        if kwargs.get("past_key_values") is None and wants_cache:
            kwargs["past_key_values"] = SplitKVCache.for_model(model)
        return generate(*args, **kwargs)

    model.generate = generate_with_split_cache
