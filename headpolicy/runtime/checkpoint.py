"""Policies that travel with Hugging Face checkpoints.

    headpolicy attach ./my-llama policy.yaml     # writes ./my-llama/head_policy.yaml
    model, tok = headpolicy.load_model("./my-llama")          # applies it (and logs so)
    model, tok = headpolicy.load_model("./my-llama", apply_policy=False)   # plain model
    model.save_pretrained("./out")               # original head order + head_policy.yaml (apply.py)

A checkpoint directory always holds the weights in the model's *original* head order, so
plain transformers loads it as the unmodified model; headpolicy finds `head_policy.yaml`
beside `config.json` and applies it on load.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
from torch import nn

from headpolicy.errors import HeadPolicyError, ModelSourceError, PolicyError
from headpolicy.models import DEFAULT_MODEL, describe_model, load_error, load_source, resolve_source
from headpolicy.policies.schema import CHECKPOINT_FILE, HeadPolicy
from headpolicy.runtime.apply import apply

log = logging.getLogger(__name__)


def policy_path(checkpoint_dir: str | os.PathLike) -> Path:
    return Path(checkpoint_dir) / CHECKPOINT_FILE


def attached_policy(checkpoint_dir: str | os.PathLike) -> HeadPolicy | None:
    """The policy attached to a checkpoint directory, or None."""
    path = policy_path(checkpoint_dir)
    return HeadPolicy.load(path) if path.is_file() else None


def load_model(source: str | os.PathLike = DEFAULT_MODEL, *, apply_policy: bool = True, **kwargs):
    """(model, tokenizer) from an alias, a checkpoint directory or a .gguf file (models.load_source),
    with the checkpoint's attached `head_policy.yaml` applied, and logged, unless apply_policy=False.

    The attached policy is read and validated before the weights load, so a bad one fails at once.
    Other keyword arguments go to models.load_source (dtype, device, config_overrides, ...).
    """
    policy, path = None, None
    if apply_policy:
        _, directory, gguf = resolve_source(source)
        if gguf is None:
            path = policy_path(directory)
            policy = _read_attached(path)
    model, tokenizer = load_source(source, **kwargs)
    if policy is not None:
        _apply_attached(model, policy, path)
    return model, tokenizer


def attach(
    checkpoint_dir: str | os.PathLike,
    policy: HeadPolicy | str | os.PathLike,
    *,
    config_overrides: dict | None = None,
    check_fingerprint: bool = True,
) -> Path:
    """Write `policy` as CHECKPOINT_DIR/head_policy.yaml after checking it was made for those weights.

    Loads the checkpoint's model (not its tokenizer) to compare fingerprints; raises
    PolicyMismatchError for a policy made for another model and leaves the directory as it was.
    check_fingerprint=False accepts a policy for the same shape but other weights (a fine-tune
    whose heads you know behave the same); the attached copy then carries these weights'
    fingerprint, so load_model applies it, and keeps the one it was compiled for in
    provenance.settings["compiled_for_fingerprint"]. `config_overrides` as in load_model (the
    same ones are needed when loading it).
    """
    from transformers import AutoModelForCausalLM

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
    except HeadPolicyError:
        raise
    except Exception as e:  # as in models.load_source: whatever a bad checkpoint makes transformers raise
        raise ModelSourceError(f"cannot load the model in {directory}: {load_error(e)}") from e
    info = describe_model(model, name=directory.name)
    policy.check_model(info, check_fingerprint=check_fingerprint)
    if policy.model.fingerprint != info.fingerprint:  # accepted for these weights: say so in the file
        policy = _refingerprinted(policy, info.fingerprint)
    path = policy.save(policy_path(directory))
    log.info("headpolicy: attached %s (%d/%d retrieval KV heads)", path, policy.num_retrieval, policy.num_heads)
    return path


def _refingerprinted(policy: HeadPolicy, fingerprint: str) -> HeadPolicy:
    settings = {**policy.provenance.settings, "compiled_for_fingerprint": policy.model.fingerprint}
    return policy.replace(
        model=dataclasses.replace(policy.model, fingerprint=fingerprint),
        provenance=dataclasses.replace(policy.provenance, settings=settings),
    )


def apply_attached(model: nn.Module, checkpoint_dir: str | os.PathLike) -> HeadPolicy | None:
    """Apply CHECKPOINT_DIR/head_policy.yaml to a freshly loaded model, if there is one."""
    path = policy_path(checkpoint_dir)
    policy = _read_attached(path)
    if policy is not None:
        _apply_attached(model, policy, path)
    return policy


_PLAIN_HINT = "(load with apply_policy=False to get the plain model)"


def _read_attached(path: Path) -> HeadPolicy | None:
    if not path.is_file():
        return None
    try:
        return HeadPolicy.load(path)
    except PolicyError as e:
        raise type(e)(f"{e} {_PLAIN_HINT}") from None


def _apply_attached(model: nn.Module, policy: HeadPolicy, path: Path) -> None:
    try:
        apply(model, policy)
    except PolicyError as e:
        raise type(e)(f"{path}: {e} {_PLAIN_HINT}") from None
    log.info(
        "headpolicy: applied %s: %d/%d KV heads retrieval, sink %d, window %d",
        path,
        policy.num_retrieval,
        policy.num_heads,
        policy.sink,
        policy.window,
    )
