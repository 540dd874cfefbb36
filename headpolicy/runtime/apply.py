"""`apply(model, policy)`: load a policy into a transformers model, in place.

1. check the policy was made for this model (shape, fingerprint);
2. plan once (policies/plan.py): per layer, the KV head order and the streaming groups;
3. permute each layer's q/k/v/o projections so retrieval KV heads (with their query
   groups) come first: the split cache then stores contiguous head ranges;
4. switch the model to the `headpolicy` attention function (transformers' AttentionInterface);
5. make `model.generate()` use a SplitKVCache unless it is given another cache, and
   `model.save_pretrained()` write the original head order plus `head_policy.yaml`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

from torch import nn

from headpolicy.errors import AlreadyAppliedError
from headpolicy.models import describe_model, get_adapter, keep_identity
from headpolicy.policies.plan import inverse, plan_layers
from headpolicy.policies.schema import CHECKPOINT_FILE, HeadPolicy
from headpolicy.runtime.attention import ATTN_NAME
from headpolicy.runtime.cache import SplitKVCache, cache_argument
from headpolicy.runtime.state import AppliedPolicy, applied, attach_state

log = logging.getLogger(__name__)


def apply(model: nn.Module, policy: HeadPolicy, *, check_fingerprint: bool = True) -> nn.Module:
    """Apply `policy` to `model` in place and return it.

    Raises PolicyMismatchError if the policy is for another model (pass
    check_fingerprint=False to accept a policy for the same shape but other weights), and
    AlreadyAppliedError if the model already carries a policy.
    """
    if applied(model) is not None:
        raise AlreadyAppliedError(
            "this model already has a headpolicy applied; load a fresh model to apply another policy"
        )
    adapter = get_adapter(model)
    info = describe_model(model)
    policy.check_model(info, check_fingerprint=check_fingerprint)

    plans = tuple(plan_layers(policy))
    keep_identity(model, info)
    for attn, plan in zip(adapter.attention_modules(model), plans, strict=True):
        if not plan.is_identity:
            adapter.permute_kv_heads(attn, plan.perm, plan.group_size, info.head_dim)

    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    attach_state(model, AppliedPolicy(policy, plans, info, adapter, previous))
    _default_split_cache(model)
    _save_with_policy(model)
    log.info(
        "headpolicy: %d/%d KV heads retrieval, sink %d, window %d",
        policy.num_retrieval,
        policy.num_heads,
        policy.sink,
        policy.window,
    )
    return model


def _default_split_cache(model: nn.Module) -> None:
    """generate() gets a fresh SplitKVCache unless the caller passes a cache or disables caching."""
    generate = model.generate
    name = cache_argument(model.forward)  # generate takes the cache under the name forward does

    @functools.wraps(generate)
    def generate_with_split_cache(*args, **kwargs):
        wants_cache = kwargs.get("use_cache", True) and "cache_implementation" not in kwargs
        given = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if wants_cache and not given:
            kwargs[name] = SplitKVCache.for_model(model)
        return generate(*args, **kwargs)

    model.generate = generate_with_split_cache


def _save_with_policy(model: nn.Module) -> None:
    """Make `model.save_pretrained` write the original head order plus the policy file."""
    original = type(model).save_pretrained.__get__(model)

    @functools.wraps(original)
    def save_with_policy(save_directory, **kwargs):
        return save_pretrained(model, save_directory, _save=original, **kwargs)

    model.save_pretrained = save_with_policy


# ---- undoing the permutation for a save ------------------------------------------------------------
@contextlib.contextmanager
def original_head_order(model: nn.Module):
    """Temporarily put an applied model's q/k/v/o weights back in their original head order.

    Permutations are row copies, so restoring is exact.
    """
    state = applied(model)
    if state is None:
        yield model
        return
    head_dim = state.info.head_dim
    moved = []
    try:
        for attn, plan in zip(state.adapter.attention_modules(model), state.plans, strict=True):
            if plan.is_identity:
                continue
            state.adapter.permute_kv_heads(attn, inverse(plan.perm), plan.group_size, head_dim)
            moved.append((attn, plan))
        yield model
    finally:
        for attn, plan in moved:
            state.adapter.permute_kv_heads(attn, plan.perm, plan.group_size, head_dim)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, _save=None, **kwargs) -> None:
    """`model.save_pretrained` for a model that may carry a policy.

    Writes the weights in original head order and the config without the headpolicy
    attention implementation, then `head_policy.yaml` beside them, so plain transformers
    loads the directory as the unmodified model and `headpolicy.load_model` applies the policy.
    """
    save = _save or type(model).save_pretrained.__get__(model)
    state = applied(model)
    if state is None:
        return save(save_directory, **kwargs)
    if "state_dict" in kwargs:
        raise ValueError("save_pretrained(state_dict=...) of a model with a policy applied is not supported")
    config = model.config
    current = config._attn_implementation
    with original_head_order(model):
        try:
            config._attn_implementation = state.previous_attn_implementation
            save(save_directory, **kwargs)
        finally:
            config._attn_implementation = current
    path = state.policy.save(Path(save_directory) / CHECKPOINT_FILE)
    log.info("headpolicy: saved %s in original head order with %s", save_directory, path.name)
    return None
