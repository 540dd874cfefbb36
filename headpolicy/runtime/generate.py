"""Greedy generation, our own loop: one prefill, then one decode step per new token.

    gen = generate(model, input_ids, max_new_tokens=16)     # tokens [B, n] + the cache it filled
    outs = answers(model, codec.decode, tasks)              # did the model produce each expected answer?

The CLI (`headpolicy generate`), the eval suite and compile's verification all run this loop,
so what they measure is what a user of an applied model gets. An applied model runs on a
fresh SplitKVCache, an unmodified one on transformers' DynamicCache: the same loop, the same
positions, so the two are compared like for like. The model's forward is called directly
(transformers' `generate()` is not needed for greedy decoding, and it would add logits
processors and deprecation warnings of its own).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache

from headpolicy.errors import PromptError
from headpolicy.policies.schema import HeadPolicy
from headpolicy.runtime.apply import apply
from headpolicy.runtime.cache import SplitKVCache, cache_argument
from headpolicy.runtime.state import applied


@dataclass
class Generation:
    tokens: torch.Tensor  # [B, n] new token ids (rows that hit EOS are padded with pad_token_id)
    cache: Cache  # the cache after the last step


def new_cache(model: nn.Module) -> Cache:
    """A SplitKVCache for an applied model, else transformers' DynamicCache (its sliding layers included)."""
    return SplitKVCache.for_model(model) if applied(model) is not None else DynamicCache(config=model.config)


def cache_bytes(cache: Cache | None) -> int:
    """Bytes of key/value tensors a cache holds (SplitKVCache: what it allocated, spare capacity
    included; `generate` reserves exactly what its tokens need, so spare only after an early EOS)."""
    if cache is None:
        return 0
    if isinstance(cache, SplitKVCache):
        return cache.kv_bytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


def context_limit(model: nn.Module) -> int | None:
    """The longest sequence (prompt + new tokens) the model was trained for, if its config says."""
    cfg = model.config
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None


def _eos_ids(model: nn.Module, eos_token_id) -> list[int]:
    eos = eos_token_id if eos_token_id is not None else getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    cache: Cache | None = None,
) -> Generation:
    """Greedy-decode up to `max_new_tokens` after `input_ids` [B, S] (left padding: attention_mask [B, S]).

    A row stops at an EOS token (eos_token_id, default the model's generation config); the
    loop stops when every row has. Raises PromptError for an empty prompt or one that, with
    the new tokens, is longer than the model's context (it would be answered wrongly, not refused).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise PromptError(f"the prompt is empty (input_ids of shape {tuple(input_ids.shape)}); give at least one token")
    B, S = input_ids.shape
    limit = context_limit(model)
    if limit is not None and S + max_new_tokens > limit:
        raise PromptError(
            f"the prompt is {S} tokens and {max_new_tokens} more are asked for, but {model.config.model_type} "
            f"models handle at most {limit} tokens; shorten the prompt or ask for fewer new tokens"
        )
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    # Positions count real tokens only (as transformers' generate does); padding slots get 1, never attended.
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = new_cache(model) if cache is None else cache
    if isinstance(cache, SplitKVCache):  # allocate once for every slot this call caches (the last token is not fed)
        cache.reserve(cache.get_seq_length() + S + max_new_tokens - 1)
    eos = torch.tensor(_eos_ids(model, eos_token_id), device=device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ids, pos, new = input_ids, positions, []
    cache_arg = cache_argument(model.forward)
    for step in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                    **{cache_arg: cache})  # fmt: skip
        token = out.logits[:, -1].argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        new.append(token)
        if eos.numel():
            done |= torch.isin(token, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        ids = token[:, None]
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos[:, -1:] + 1
    tokens = torch.stack(new, dim=1) if new else input_ids.new_zeros(B, 0)
    return Generation(tokens, cache)


# ---- answers: did the model produce what a task expects? -------------------------------------------
class Prompted(Protocol):
    """A prompt with an expected answer (profiler.tasks.Task is one)."""

    input_ids: Sequence[int]
    answer_ids: Sequence[int]
    answer: str


@dataclass(frozen=True)
class Outcome:
    task: Prompted
    correct: bool
    output: str
    kv_bytes: int  # cache bytes after generation, measured from the cache object


def answer(model: nn.Module, decode: Callable[[list[int]], str], task: Prompted, *, extra_tokens: int = 1) -> Outcome:
    """Greedy-decode len(answer) + extra_tokens tokens after the prompt; correct when the text,
    leading space stripped, starts with the expected answer."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(task.input_ids)], dtype=torch.long, device=device)
    gen = generate(model, ids, max_new_tokens=len(task.answer_ids) + extra_tokens)
    text = decode(gen.tokens[0].tolist())
    correct = text.strip().startswith(task.answer.strip()) if task.answer else False
    return Outcome(task, correct, text, cache_bytes(gen.cache))


def answers(
    model: nn.Module,
    decode: Callable[[list[int]], str],
    tasks: Sequence[Prompted],
    *,
    progress=None,
    max_misses: int | None = None,
) -> list[Outcome]:
    """`answer` for each task in order; with `max_misses`, stop after the first miss beyond it."""
    outs, misses = [], 0
    for t in tasks:
        outs.append(answer(model, decode, t))
        misses += not outs[-1].correct
        if progress is not None:
            progress.update(1)
        if max_misses is not None and misses > max_misses:
            break
    return outs


def applied_copy(model: nn.Module, policy: HeadPolicy, *, check_fingerprint: bool = True) -> nn.Module:
    """A copy of `model` with `policy` applied (the original stays unmodified)."""
    return apply(copy.deepcopy(model), policy, check_fingerprint=check_fingerprint)
