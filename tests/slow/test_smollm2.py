"""The bundled real model: SmolLM2-135M-Instruct (30 layers, 9 query heads, 3 KV heads)."""

import copy

import pytest
import torch

from headpolicy import HeadPolicy, SplitKVCache, apply, describe_model, load_model

pytestmark = pytest.mark.slow

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(passkey: int, n_filler: int = 40, depth: float = 0.4) -> str:
    parts = [FILLER] * n_filler
    parts.insert(int(depth * n_filler), f"The pass key is {passkey}. Remember it. {passkey} is the pass key. ")
    head = "There is a pass key hidden in a lot of irrelevant text. Find it and memorize it.\n"
    return head + "".join(parts) + "\nWhat is the pass key? The pass key is"


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


@pytest.mark.ci
def test_all_retrieval_policy_keeps_passkey_answer(smollm2):
    model, tok = smollm2
    info = describe_model(model)
    assert (info.num_layers, info.num_attention_heads, info.num_kv_heads) == (30, 9, 3)
    enc = tok(passkey_prompt(58213), return_tensors="pt")
    n = enc["input_ids"].shape[1]
    with torch.no_grad():
        full_logits = model(**enc).logits
        full = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert "58213" in tok.decode(full[0, n:])

    applied = apply(copy.deepcopy(model), HeadPolicy.from_kinds(info, [[True] * 3] * 30, sink=64, window=256))
    cache = SplitKVCache.for_model(applied)
    with torch.no_grad():
        assert (applied(**enc).logits - full_logits).abs().max().item() <= 1e-4
        out = applied.generate(**enc, max_new_tokens=6, do_sample=False, cache=cache)
    assert torch.equal(out, full)
    assert cache.kv_bytes_used() == 2 * 30 * 3 * 64 * 4 * (n + 5)  # every head keeps every token
    assert cache.kv_bytes() >= cache.kv_bytes_used()  # capacity: grown in blocks


def test_fingerprint_is_stable_across_loads(smollm2):
    model, _ = smollm2
    again, _ = load_model("smollm2-135m")
    assert describe_model(again).fingerprint == describe_model(model).fingerprint
