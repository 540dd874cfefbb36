"""Model-level invariants of apply(): exactness, parity with the dense reference, real memory."""

import copy

import pytest
import torch
from transformers import DynamicCache

from headpolicy import AlreadyAppliedError, HeadSpec, PolicyMismatchError, SplitKVCache, apply, describe_model
from headpolicy.runtime.attention import REFERENCE_ATTN_NAME
from headpolicy.runtime.cache import GROW_MIN, GROW_SHARE
from tests.conftest import policy_for, tiny_llama


def greedy(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n, **kw)


def test_all_retrieval_reproduces_model():
    base = tiny_llama(layers=3)
    model = apply(copy.deepcopy(base), policy_for(base, [[True, True]] * 3))
    ids = torch.randint(3, 97, (2, 41))
    with torch.no_grad():
        diff = (base(ids).logits - model(ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert torch.equal(greedy(base, ids, 30), greedy(model, ids, 30))


def mixed_policy(model, sink=3, window=8):
    """Non-identity head order in every layer, two streaming groups in layer 1."""
    policy = policy_for(model, [[False, True], [False, False], [True, False]], sink=sink, window=window)
    layers = list(policy.layers)
    layers[1] = (HeadSpec("streaming", sink=1, window=5), HeadSpec("streaming"))
    return policy.replace(layers=tuple(layers))


def reference_model(applied):
    ref = copy.deepcopy(applied)
    ref.set_attn_implementation(REFERENCE_ATTN_NAME)
    return ref


@pytest.mark.parametrize("batch_lengths", [[13], [13, 9]])
def test_mixed_policy_matches_reference_every_decode_step(batch_lengths):
    """Prefill, then decode 3x past the window (29 steps: not a multiple of any chunk size)."""
    base = tiny_llama(layers=3, seed=1)
    policy = mixed_policy(base, window=8)
    model = apply(copy.deepcopy(base), policy)
    ref = reference_model(model)
    T0 = max(batch_lengths)
    ids = torch.randint(3, 97, (len(batch_lengths), T0))
    mask = torch.zeros_like(ids)
    for b, n in enumerate(batch_lengths):
        mask[b, T0 - n :] = 1
    cache, ref_cache = SplitKVCache.for_model(model), DynamicCache()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    step_ids = ids
    with torch.no_grad():
        for step in range(1 + 3 * policy.window + 5):
            out = model(step_ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            exp = ref(step_ids, attention_mask=mask, position_ids=pos, cache=ref_cache, use_cache=True)
            real = mask[:, -step_ids.shape[1] :].bool()
            diff = (out.logits - exp.logits).abs()[real].max().item()
            assert diff <= 1e-4, f"step {step}: max |logit diff| {diff}"
            step_ids = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            pos = pos[:, -1:] + 1
    # the split cache really dropped old tokens while the reference kept them all
    assert cache.cached_tokens() < sum(layer.keys.shape[1] * layer.keys.shape[2] for layer in ref_cache.layers)


def test_generate_uses_split_cache_and_matches_manual_loop():
    base = tiny_llama(layers=3, seed=2)
    model = apply(copy.deepcopy(base), mixed_policy(base))
    ref = reference_model(model)
    ids = torch.randint(3, 97, (1, 11))
    out = greedy(model, ids, 30)  # generate() builds a SplitKVCache itself
    exp = greedy(ref, ids, 30, cache=DynamicCache())
    assert torch.equal(out, exp)


def test_left_padded_batch_equals_each_sequence_alone():
    base = tiny_llama(layers=2, seed=3)
    model = apply(copy.deepcopy(base), policy_for(base, [[False, True], [True, False]], sink=2, window=6))
    a, b = torch.randint(3, 97, (1, 15)), torch.randint(3, 97, (1, 8))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :7] = 0
    n = 20
    both = greedy(model, batch, n, attention_mask=mask, pad_token_id=0)
    assert torch.equal(both[0, 15:], greedy(model, a, n)[0, 15:])
    assert torch.equal(both[1, 15:], greedy(model, b, n)[0, 8:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reserve", [0, 24])
def test_cache_bytes_used_equal_formula_and_allocated_equal_storage(dtype, reserve):
    """kv_bytes_used() is the formula; kv_bytes() is every byte the buffers allocated, no more, no less."""
    sink, window = 4, 8
    base = tiny_llama(layers=2, seed=4, dtype=dtype)
    policy = policy_for(base, [[True, False], [False, False]], sink=sink, window=window)
    model = apply(base, policy)
    head_dim, esize = describe_model(model).head_dim, torch.tensor([], dtype=dtype).element_size()
    cache = SplitKVCache.for_model(model).reserve(reserve)  # 0: grow as tokens come
    ids = torch.randint(3, 97, (1, 5))
    T = 0
    with torch.no_grad():
        for _ in range(20):
            model(ids, cache=cache, use_cache=True)
            T += ids.shape[1]
            tokens = 1 * T + 3 * min(T, sink + window)  # 1 retrieval head, 3 streaming heads
            assert cache.kv_bytes_used() == 2 * head_dim * esize * tokens == policy.kv_bytes(T, dtype_bytes=esize)
            buffers = [layer.retrieval for layer in cache.layers] + [s.kv for lay in cache.layers for s in lay.streams]
            held = [t for buf in buffers for t in buf.allocated]
            # every buffer owns exactly its storage, and kv_bytes() counts all of it
            assert all(t.untyped_storage().nbytes() == t.nbytes for t in held)
            assert cache.kv_bytes() == sum(t.nbytes for t in held) >= cache.kv_bytes_used()
            for layer in cache.layers:  # the views attention reads share the buffers' storage
                assert layer.keys.untyped_storage().data_ptr() == layer.retrieval.allocated[0].data_ptr()
                assert layer.retrieval.capacity <= max(reserve, T + max(GROW_MIN, T // GROW_SHARE))
                assert all(s.kv.capacity <= sink + window for s in layer.streams)
            ids = torch.randint(3, 97, (1, 1))
    if reserve:  # reserved for exactly the 24 tokens that came: nothing spare
        assert T == reserve and cache.kv_bytes() == cache.kv_bytes_used()


def test_apply_twice_raises():
    model = tiny_llama()
    policy = policy_for(model, [[True, False]] * 2)
    apply(model, policy)
    with pytest.raises(AlreadyAppliedError):
        apply(model, policy)


def test_policy_for_other_model_raises():
    model = tiny_llama(seed=0)
    other_weights = policy_for(tiny_llama(seed=5), [[True, False]] * 2)
    with pytest.raises(PolicyMismatchError, match="fingerprint"):
        apply(model, other_weights)
    other_shape = policy_for(tiny_llama(layers=3), [[True, False]] * 3)
    with pytest.raises(PolicyMismatchError, match="3 layers x 2 KV heads"):
        apply(model, other_shape)
    apply(model, other_weights, check_fingerprint=False)  # experts may override


def test_mha_model():
    base = tiny_llama(heads=4, kv_heads=4, head_dim=12, seed=6)
    model = apply(copy.deepcopy(base), policy_for(base, [[False, True, False, True]] * 2, sink=2, window=5))
    ref = reference_model(model)
    ids = torch.randint(3, 97, (1, 9))
    assert torch.equal(greedy(model, ids, 20), greedy(ref, ids, 20, cache=DynamicCache()))
