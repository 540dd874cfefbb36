"""Quantised KV heads (issue 14) through the PyTorch runtime: storage, attention, bytes, a model.

Every attention result is compared with the dense reference (policies/rule.reference_attention)
on the *stored* values: dequantised past tokens, plus this call's own tokens at full precision
for a prefill (a decode step attends its token as stored).
"""


import pytest
import torch

from headpolicy import SplitKVCache, apply
from headpolicy.models import describe_model
from headpolicy.policies.precision import kv_head_bytes, quantized_tokens
from headpolicy.policies.rule import reference_attention
from headpolicy.runtime.cache import SplitKVLayer
from tests.conftest import attend, make_plan, policy_for, stored_kv, tiny_llama

PLANS = {
    # 1 native + 1 int8 + 2 int4 retrieval heads; streaming: native, int8 and int4 groups (one sink=0)
    "mixed-gqa": make_plan(4, [(1, 3, 5), (2, 2, 4, 8), (1, 0, 3, 4)], 2, retrieval_bits=((1, 8), (2, 4)),
                           kv_group=4, kv_residual=3),  # fmt: skip
    # no native part at all, residual 0: a decode token may be quantised as soon as its group is whole
    "all-quantised-mha": make_plan(2, [(2, 2, 5, 8)], 1, retrieval_bits=((2, 4),), kv_group=2, kv_residual=0),
}


def _reference(plan, q, K, V, key_valid, scale):
    retrieval, sink, window = plan.table_tensors()
    return reference_attention(q, K, V, retrieval=retrieval, sink=sink, window=window, key_valid=key_valid,
                               scale=scale)  # fmt: skip


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("padded", [False, True])
def test_quantised_layer_equals_dense_reference_on_stored_values(plan_name, padded):
    """Two prefill chunks (7 + 4 tokens, the second over a quantised past), then 12 decode steps:
    rings wrap, groups age out of the residual, left padding in row 1."""
    plan = PLANS[plan_name]
    B, D, T, scale = 2, 16, 23, 0.3
    Hq = plan.num_kv_heads * plan.group_size
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, plan.num_kv_heads, T, D, generator=g)
    v = torch.randn(B, plan.num_kv_heads, T, D, generator=g)
    k[..., 3] *= 10  # an outlier channel, as keys have
    mask = torch.ones(B, T, dtype=torch.bool)
    if padded:
        mask[1, :3] = False
    layer = SplitKVLayer(plan)
    steps = [(0, 7), (7, 11)] + [(t, t + 1) for t in range(11, T)]
    with torch.no_grad():
        for a, b in steps:
            if a:
                past_k, past_v = stored_kv(layer, mask[:, :a], torch.float32)
            view, _ = layer.update(k[:, :, a:b], v[:, :, a:b])
            out = attend(plan, q[:, :, a:b], view, view, mask[:, :b].long(), scale)
            if b - a == 1:  # decode: the token was stored first
                K, V = stored_kv(layer, mask[:, :b], torch.float32)
            elif a == 0:
                K, V = k[:, :, :b], v[:, :, :b]
            else:  # the past as stored, this chunk at full precision
                K, V = torch.cat([past_k, k[:, :, a:b]], dim=2), torch.cat([past_v, v[:, :, a:b]], dim=2)
            ref = _reference(plan, q[:, :, a:b], K, V, mask[:, :b], scale)
            real = mask[:, a:b]
            torch.testing.assert_close(out.transpose(1, 2)[real], ref.transpose(1, 2)[real], atol=2e-5, rtol=2e-5,
                                       msg=f"step {a}:{b}")  # fmt: skip
        for part in layer.qparts:  # the residual rule: whole groups, at least kv_residual tokens at full precision
            assert part.quantized_tokens == quantized_tokens(T, plan.kv_group, plan.kv_residual) > 0


@pytest.mark.parametrize("bits", [8, 4])
def test_stored_keys_and_values_are_within_the_quantisation_bound(bits):
    """What the cache stores differs from the model's K/V by no more than the rule's bound, group by group."""
    plan = make_plan(1, [(1, 2, 6, bits)], 1, retrieval_bits=((1, bits),), kv_group=4, kv_residual=2)
    B, D, T = 2, 16, 19
    g = torch.Generator().manual_seed(bits)
    k, v = torch.randn(B, 2, T, D, generator=g) * 4, torch.randn(B, 2, T, D, generator=g)
    layer = SplitKVLayer(plan)
    for t in range(T):
        view, _ = layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        layer.commit(view, None)
    part, stream = layer.qparts[0], layer.streams[0]
    n = part.quantized_tokens
    for stored, original in ((part.k, k[:, :1, :n]), (part.v, v[:, :1, :n])):
        assert ((stored.dequantize() - original).abs() <= stored.error_bound()).all()
    assert torch.equal(part.k_tail, k[:, :1, n:])  # the residual is exact
    order = stream.rank[0]  # slot -> rank, the same in every row here
    for stored, original in ((stream.k, k[:, 1:]), (stream.v, v[:, 1:])):
        assert ((stored.dequantize() - original[:, :, order]).abs() <= stored.error_bound()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reserve", [0, 25])
def test_quantised_cache_bytes_used_equal_formula_and_allocated_equal_storage(dtype, reserve):
    """kv_bytes_used() is the formula (codes, scales, zeros, residual); kv_bytes() is every byte
    allocated. Reserved exactly, only the residual's buffer keeps spare slots (< kv_group tokens)."""
    base = tiny_llama(layers=2, seed=4, dtype=dtype)
    bits = [[8, 4], [16, 4]]
    group, residual, sink, window = 4, 3, 3, 6
    policy = policy_for(base, [[True, False], [True, True]], sink=sink, window=window, bits=bits, kv_group=group,
                        kv_residual=residual)  # fmt: skip
    model = apply(base, policy)
    esize = torch.tensor([], dtype=dtype).element_size()
    cache = SplitKVCache.for_model(model).reserve(reserve)  # 0: grow as tokens come
    ids = torch.randint(3, 97, (1, 5))
    T = 0
    with torch.no_grad():
        for _ in range(21):
            model(ids, cache=cache, use_cache=True)
            T += ids.shape[1]
            assert cache.kv_bytes_used() == policy.kv_bytes(T, dtype_bytes=esize)
            held = []
            for layer in cache.layers:
                held += layer.retrieval.allocated
                held += [t for s in layer.streams for t in s.kv.allocated]
                held += [t for p in layer.qparts for t in p.allocated]
                assert all(s.kv.capacity <= sink + window for s in layer.streams)
                assert all(p.tail.capacity <= residual + group for p in layer.qparts)  # trimmed after the prefill
            assert all(t.untyped_storage().nbytes() == t.nbytes for t in held)  # each buffer owns its storage
            assert cache.kv_bytes() == sum(t.nbytes for t in held) >= cache.kv_bytes_used()
            ids = torch.randint(3, 97, (1, 1))
    if reserve:
        assert T == reserve
        D = describe_model(model).head_dim
        spare = sum((p.tail.capacity - p.tail.size) * p.group.num_heads for lay in cache.layers for p in lay.qparts)
        assert 0 < spare and all(p.tail.capacity - p.tail.size < group for lay in cache.layers for p in lay.qparts)
        assert cache.kv_bytes() - cache.kv_bytes_used() == 2 * spare * D * esize

        def head(p, allocated):
            return kv_head_bytes(T, head_dim=D, dtype_bytes=esize, bits=p.group.bits, group=group, residual=residual,
                                 allocated=allocated)  # fmt: skip

        extra = sum((head(p, True) - head(p, False)) * p.group.num_heads for lay in cache.layers for p in lay.qparts)
        assert cache.kv_bytes() - cache.kv_bytes_used() == extra  # what compile's knapsack charges (allocated=True)


def test_quant_token_buffer_keeps_its_codes_across_growth():
    """Whole key groups appended one at a time through several reallocations read back exactly
    what quantising them at once gives (codes by token, per-channel scales by group)."""
    from headpolicy.policies.precision import cat, quantize
    from headpolicy.runtime.quant_cache import QuantTokenBuffer

    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 3, 600, 8, generator=g), torch.randn(2, 3, 600, 8, generator=g)
    buf = QuantTokenBuffer(2, 3, 8, 4, 4, keys_per_channel=True, device="cpu")
    capacities = set()
    for t in range(0, 600, 4):
        buf.append(k[:, :, t : t + 4], v[:, :, t : t + 4])
        capacities.add(buf.capacity)
    assert len(capacities) > 1 and all(c % 4 == 0 for c in capacities) and buf.size == 600
    want_k = cat([quantize(k[:, :, t : t + 4], 4, 4, per_channel=True) for t in range(0, 600, 4)])
    for got, want in zip(buf.k.tensors(), want_k.tensors(), strict=True):
        assert torch.equal(got, want)
    for got, want in zip(buf.v.tensors(), quantize(v, 4, 4, per_channel=False).tensors(), strict=True):
        assert torch.equal(got, want)
    assert buf.used_nbytes == buf.k.nbytes + buf.v.nbytes < buf.nbytes
