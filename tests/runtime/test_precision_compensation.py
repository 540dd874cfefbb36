"""Quantised heads (issue 14) and compensation tokens (issue 13) in one layer and one model.

A head is never both (QuantizedCompensationError); quantised heads beside compensated ones are
compared with the dense reference with compensation (policies/rule.reference_attention) on what
the cache holds: the quantised heads' dequantised past, every other head's tokens as given.
"""

import copy

import pytest
import torch

from headpolicy import HeadPolicy, SplitKVCache, apply, describe_model
from headpolicy.errors import QuantizedCompensationError
from headpolicy.policies.rule import reference_attention
from headpolicy.runtime import attention
from headpolicy.runtime.cache import SplitKVLayer
from tests.conftest import attend, make_plan, stored_kv, tiny_llama

# native, int8 and int4 retrieval heads; a compensated GQA group, a plain one and an int8 one
PLAN = make_plan(3, [(2, 2, 5, True), (1, 1, 4), (1, 2, 5, 8)], 2, retrieval_bits=((1, 8), (1, 4)), kv_group=4,
                 kv_residual=3)  # fmt: skip


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(attention, "query_block", lambda window: 3)  # several blocks, a ragged last one


def _reference(plan, q, K, V, key_valid, scale):
    retrieval, sink, window = plan.table_tensors()
    return reference_attention(q, K, V, retrieval=retrieval, sink=sink, window=window, key_valid=key_valid,
                               scale=scale, compensate=torch.tensor(plan.head_compensate))  # fmt: skip


def _quantised_heads(plan) -> list[slice]:
    return [slice(g.start, g.stop) for g in plan.retrieval_groups] + [
        slice(g.start, g.stop) for g in plan.groups if g.quantized
    ]


@pytest.mark.parametrize("padded", [False, True])
def test_quantised_and_compensated_heads_in_one_layer_match_the_reference(padded):
    """Two prefill chunks (7 + 4 tokens, the second over a cached past), then 12 decode steps."""
    plan = PLAN
    assert plan.quantized and plan.compensated
    B, D, T, scale = 2, 16, 23, 0.3
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, plan.num_kv_heads * plan.group_size, T, D, generator=g)
    k = torch.randn(B, plan.num_kv_heads, T, D, generator=g) + 0.5  # a mean away from zero: the token matters
    v = torch.randn(B, plan.num_kv_heads, T, D, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    if padded:
        mask[1, :3] = False
    layer = SplitKVLayer(plan)
    quantised = _quantised_heads(plan)
    with torch.no_grad():
        for a, b in [(0, 7), (7, 11)] + [(t, t + 1) for t in range(11, T)]:
            if a:
                past_k, past_v = stored_kv(layer, mask[:, :a], torch.float32)
            view, _ = layer.update(k[:, :, a:b], v[:, :, a:b])
            out = attend(plan, q[:, :, a:b], view, view, mask[:, :b].long(), scale)
            K, V = k[:, :, :b].clone(), v[:, :, :b].clone()  # compensation needs every dropped token as given
            if b - a == 1:  # decode: the token was stored first
                sk, sv = stored_kv(layer, mask[:, :b], torch.float32)
            elif a:  # the past as stored, this chunk at full precision
                sk, sv = torch.cat([past_k, k[:, :, a:b]], dim=2), torch.cat([past_v, v[:, :, a:b]], dim=2)
            else:
                sk, sv = K, V
            for heads in quantised:
                K[:, heads], V[:, heads] = sk[:, heads], sv[:, heads]
            ref = _reference(plan, q[:, :, a:b], K, V, mask[:, :b], scale)
            real = mask[:, a:b]
            torch.testing.assert_close(out.transpose(1, 2)[real], ref.transpose(1, 2)[real], atol=2e-5, rtol=2e-5,
                                       msg=f"step {a}:{b}")  # fmt: skip
    (comp,) = [s for s in layer.streams if s.group.compensate]
    assert comp.comp_k is not None and all(s.comp_k is None for s in layer.streams if not s.group.compensate)


def mixed_policy(model, sink=3, window=5) -> HeadPolicy:
    """Layer 0: an int8 retrieval head + a compensated streaming head; layer 1: a compensated
    streaming head + an int4 streaming head that does not compensate."""
    rules = [[None, (sink, window)], [(sink, window), (1, 4, False)]]
    return HeadPolicy.from_rules(describe_model(model), rules, defaults=(sink, window), compensate=True,
                                 bits=[[8, 16], [16, 4]], kv_group=4, kv_residual=3)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_applied_model_with_both_counts_its_bytes_exactly(dtype):
    base = tiny_llama(layers=2, seed=3, dtype=dtype)
    policy = mixed_policy(base)
    assert policy.num_quantized == 2 and policy.num_compensated == 2
    model = apply(copy.deepcopy(base), policy)
    esize = torch.tensor([], dtype=dtype).element_size()
    cache = SplitKVCache.for_model(model)
    ids, T = torch.randint(3, 97, (1, 9)), 0
    with torch.no_grad():
        for _ in range(14):
            logits = model(ids, cache=cache, use_cache=True).logits
            T += ids.shape[1]
            assert torch.isfinite(logits).all()
            assert cache.kv_bytes_used() == policy.kv_bytes(T, dtype_bytes=esize)  # codes, scales, residual, sums
            ids = logits[:, -1:].argmax(-1)
    plain = apply(copy.deepcopy(base), policy.replace(compensate=False))  # the tokens are attended
    ids = torch.randint(3, 97, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits.float(), model(ids).logits.float(), atol=1e-4)


def test_one_head_both_quantised_and_compensated_is_refused():
    base = tiny_llama(layers=2, seed=3)
    with pytest.raises(QuantizedCompensationError, match="layer 0 head 1: a compensation token on a quantised head"):
        mixed_policy(base).replace(kv_bits=8)  # the compensated heads would inherit 8 bits
    with pytest.raises(QuantizedCompensationError, match="kv_bits 4"):
        make_plan(0, [(1, 2, 5, 4, True)], 1)
