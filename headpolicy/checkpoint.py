"""Policies that travel with Hugging Face checkpoints.

    headpolicy attach ./my-llama policy.yaml     # writes ./my-llama/head_policy.yaml
    model, tok = headpolicy.load_model("./my-llama")          # applies it (and logs so)
    model, tok = headpolicy.load_model("./my-llama", apply_policy=False)   # plain model
    model.save_pretrained("./out")               # original head order + head_policy.yaml

A checkpoint directory always holds the weights in the model's *original* head order, so
plain transformers loads it as the unmodified model; headpolicy finds `head_policy.yaml`
beside `config.json` and applies it on load.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

import torch
from torch import nn

from headpolicy.errors import ModelSourceError, PolicyError
from headpolicy.policies.schema import HeadPolicy

log = logging.getLogger(__name__)

POLICY_FILE = "head_policy.yaml"


def policy_path(checkpoint_dir: str | os.PathLike) -> Path:
    return Path(checkpoint_dir) / POLICY_FILE


def attached_policy(checkpoint_dir: str | os.PathLike) -> HeadPolicy | None:
    """The policy attached to a checkpoint directory, or None."""
    path = policy_path(checkpoint_dir)
    return HeadPolicy.load(path) if path.is_file() else None


def attach(
    checkpoint_dir: str | os.PathLike,
    policy: HeadPolicy | str | os.PathLike,
    *,
    config_overrides: dict | None = None,
) -> Path:
    """Write `policy` as CHECKPOINT_DIR/head_policy.yaml after checking it was made for those weights.

    Loads the checkpoint's model (not its tokenizer) to compare fingerprints; raises
    PolicyMismatchError for a policy made for another model and leaves the directory as it was.
    `config_overrides` as in load_model (the same ones are needed when loading it).
    """
    from transformers import AutoModelForCausalLM

    from headpolicy.models import describe_model

    directory = Path(checkpoint_dir)
    if not (directory / "config.json").is_file():
        raise ModelSourceError(f"{directory} has no config.json: not a Hugging Face checkpoint directory")
    if not isinstance(policy, HeadPolicy):
        policy = HeadPolicy.load(policy)
    try:
        # The fingerprint hashes weights rounded to bfloat16, so a bfloat16 load gives the same
        # fingerprint at half the memory of float32.
        model = AutoModelForCausalLM.from_pretrained(
            directory, local_files_only=True, dtype=torch.bfloat16, **(config_overrides or {})
        )
    except (OSError, ValueError, KeyError) as e:
        raise ModelSourceError(f"cannot load the model in {directory}: {' '.join(str(e).split())[:400]}") from e
    info = describe_model(model, name=directory.name)
    policy.check_model(info)
    path = policy.save(policy_path(directory))
    log.info("headpolicy: attached %s (%d/%d retrieval KV heads)", path, policy.num_retrieval, policy.num_heads)
    return path


def apply_attached(model: nn.Module, checkpoint_dir: str | os.PathLike) -> HeadPolicy | None:
    """Apply CHECKPOINT_DIR/head_policy.yaml to a freshly loaded model, if there is one."""
    from headpolicy.runtime.apply import apply

    path = policy_path(checkpoint_dir)
    if not path.is_file():
        return None
    policy = HeadPolicy.load(path)
    try:
        apply(model, policy)
    except PolicyError as e:
        raise type(e)(f"{path}: {e} (load with apply_policy=False to get the plain model)") from None
    log.info(
        "headpolicy: applied %s: %d/%d KV heads retrieval, sink %d, window %d",
        path,
        policy.num_retrieval,
        policy.num_heads,
        policy.sink,
        policy.window,
    )
    return policy


# ---- saving an applied model -----------------------------------------------------------------
@contextlib.contextmanager
def original_head_order(model: nn.Module):
    """Temporarily put an applied model's q/k/v/o weights back in their original head order.

    Permutations are row copies, so restoring is exact.
    """
    applied = getattr(model, "_headpolicy", None)
    if applied is None:
        yield model
        return
    adapter = applied.adapter
    head_dim = applied.info.head_dim
    attns = adapter.attention_modules(model)
    moved = []
    try:
        for attn, plan in zip(attns, applied.plans, strict=True):
            if plan.is_identity:
                continue
            inverse = [0] * len(plan.perm)
            for i, p in enumerate(plan.perm):
                inverse[p] = i
            adapter.permute_kv_heads(attn, inverse, plan.group_size, head_dim)
            moved.append((attn, plan))
        yield model
    finally:
        for attn, plan in moved:
            adapter.permute_kv_heads(attn, list(plan.perm), plan.group_size, head_dim)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, _save=None, **kwargs) -> None:
    """`model.save_pretrained` for a model that may carry a policy.

    Writes the weights in original head order and the config without the headpolicy
    attention implementation, then `head_policy.yaml` beside them.
    """
    save = _save or type(model).save_pretrained.__get__(model)
    applied = getattr(model, "_headpolicy", None)
    if applied is None:
        return save(save_directory, **kwargs)
    if "state_dict" in kwargs:
        raise ValueError("save_pretrained(state_dict=...) of a model with a policy applied is not supported")
    config = model.config
    current = config._attn_implementation
    with original_head_order(model):
        try:
            config._attn_implementation = applied.previous_attn_implementation
            save(save_directory, **kwargs)
        finally:
            config._attn_implementation = current
    path = applied.policy.save(policy_path(save_directory))
    log.info("headpolicy: saved %s in original head order with %s", save_directory, path.name)
    return None


def install_save_hook(model: nn.Module) -> None:
    """Make `model.save_pretrained` write the original head order plus the policy file."""
    original = type(model).save_pretrained.__get__(model)

    @functools.wraps(original)
    def save_with_policy(save_directory, **kwargs):
        return save_pretrained(model, save_directory, _save=original, **kwargs)

    model.save_pretrained = save_with_policy
