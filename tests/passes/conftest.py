"""Helpers for pass tests: the semantic reference (reference_attention inside the model)."""

import torch
from transformers import AttentionInterface

from headpolicy.models import get_adapter
from headpolicy.policies.rule import reference_attention

REF_NAME = "headpolicy_test_reference"


def _reference_attention_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    retrieval, sink, window = module._hp_reference
    out = reference_attention(query, key, value, retrieval=retrieval, sink=sink, window=window, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REF_NAME, _reference_attention_fn)


@torch.no_grad()
def reference_logits(model, policy, ids: torch.Tensor) -> torch.Tensor:
    """Logits [1, T, V] of the unmodified model with every layer's attention = reference_attention."""
    for li, attn in enumerate(get_adapter(model).attention_modules(model)):
        row = policy.layers[li]
        windows = [policy.head_window(li, h) for h in range(len(row))]
        attn._hp_reference = (
            torch.tensor([s.is_retrieval for s in row]),
            torch.tensor([w[0] for w in windows]),
            torch.tensor([w[1] for w in windows]),
        )
    previous = model.config._attn_implementation
    model.set_attn_implementation(REF_NAME)
    try:
        return model(ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def run_steps(prefill, decode, ids: torch.Tensor, prompt_len: int) -> list[torch.Tensor]:
    """Prefill ids[:, :prompt_len], then decode the rest one token at a time.

    Returns the logits [V] for positions prompt_len - 1 .. T - 1 (each predicts the next token).
    """
    out = prefill.gm(ids[:, :prompt_len])
    logits, cache = [out[0][0, -1]], list(out[1:])
    for t in range(prompt_len, ids.shape[1]):
        out = decode.gm(ids[:, t : t + 1], torch.tensor([[t]]), *cache)
        logits.append(out[0][0, -1])
        cache = list(out[1:])
    return logits, cache
