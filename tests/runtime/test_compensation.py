"""The compensation token on the CPU paths (prefill, decode, the split cache) against the dense
reference with compensation (policies/rule.reference_attention), and its storage."""

import pytest
import torch

from headpolicy.policies.rule import dropped_count, reference_attention
from headpolicy.runtime import attention
from headpolicy.runtime.cache import SplitKVLayer
from tests.conftest import attend, make_plan

PLANS = {  # (heads, sink, window, compensate): odd windows, mixed flags and windows in one layer, GQA
    "one": make_plan(0, [(1, 2, 3, True)], 2),
    "mixed-flags": make_plan(1, [(1, 2, 5, False), (2, 2, 5, True)], 3),
    "mixed-windows": make_plan(1, [(1, 0, 1, True), (1, 1, 4, False), (2, 3, 7, True)], 2),
    "no-sink": make_plan(0, [(2, 0, 3, True)], 1),
}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(attention, "query_block", lambda window: 3)  # several blocks, a ragged last one


def reference(plan, q, k, v, mask, scale):
    retrieval, sink, window = plan.table_tensors()
    compensate = torch.tensor(plan.head_compensate)
    return reference_attention(q, k, v, retrieval=retrieval, sink=sink, window=window, key_valid=mask, scale=scale,
                               compensate=compensate)  # fmt: skip


def rand_qkv(plan, B, S, D=8, seed=0, T=None):
    g = torch.Generator().manual_seed(seed)
    H = plan.num_kv_heads
    q = torch.randn(B, H * plan.group_size, S, D, generator=g)
    k = torch.randn(B, H, T or S, D, generator=g) + 0.5  # a mean away from zero: the token matters
    v = torch.randn(B, H, T or S, D, generator=g)
    return q, k, v


def left_padding_mask(lengths, T):
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
    return mask


def real_rows(out, mask):
    return out if mask is None else out * mask[:, -out.shape[2] :][:, None, :, None]


def test_the_token_changes_the_output():
    plan = PLANS["one"]
    q, k, v = rand_qkv(plan, 1, 12)
    retrieval, sink, window = plan.table_tensors()
    plain = reference_attention(q, k, v, retrieval=retrieval, sink=sink, window=window)
    comp = reference(plan, q, k, v, None, None)
    assert torch.equal(comp[:, :, :5], plain[:, :, :5])  # ranks < sink + window drop nothing
    assert (comp[:, :, 5:] - plain[:, :, 5:]).abs().amin(dim=-1).gt(0).all()


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("S", [1, 4, 13, 30])
@pytest.mark.parametrize("padded", [False, True])
def test_prefill_matches_reference(plan_name, S, padded):
    plan = PLANS[plan_name]
    q, k, v = rand_qkv(plan, 2, S)
    mask = left_padding_mask([S, max(1, S - 4)], S) if padded else None
    out = attend(plan, q, k, v, mask, 0.3)
    ref = reference(plan, q, k, v, mask, 0.3)
    torch.testing.assert_close(real_rows(out, mask), real_rows(ref, mask), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("plan_name", ["mixed-flags", "mixed-windows"])
@pytest.mark.parametrize("S", [1, 6])
@pytest.mark.parametrize("mask_kind", [None, "left", "right"])
def test_queries_after_uncached_keys_and_any_padding_match_reference(plan_name, S, mask_kind):
    plan, T = PLANS[plan_name], 23
    q, k, v = rand_qkv(plan, 2, S, T=T, seed=2)
    mask = None
    if mask_kind == "left":
        mask = left_padding_mask([T, T - 6], T)
    elif mask_kind == "right":
        mask = torch.ones(2, T, dtype=torch.long)
        mask[1, 5:9] = 0  # a hole: the rank path
    out = attend(plan, q, k, v, mask, 0.7)
    ref = reference(plan, q, k, v, mask, 0.7)
    torch.testing.assert_close(real_rows(out, mask), real_rows(ref, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize(
    "steps", [[9, 1, 1, 1, 3, 1, 7, 1, 1, 1, 1, 1, 2], [1] * 22, [26, 1, 1], [4, 11, 1, 1, 9, 1, 13]]
)
@pytest.mark.parametrize("padded", [False, True])
def test_split_cache_matches_reference_step_by_step(plan_name, steps, padded):
    """Prefill, decode past the window and chunked prefill through the split cache."""
    plan = PLANS[plan_name]
    T = sum(steps)
    q, k, v = rand_qkv(plan, 2, T, seed=1)
    mask = left_padding_mask([T, T - 3], T) if padded else None
    layer, start = SplitKVLayer(plan), 0
    for n in steps:
        stop = start + n
        view, _ = layer.update(k[:, :, start:stop], v[:, :, start:stop])
        step_mask = None if mask is None else mask[:, :stop]
        out = attend(plan, q[:, :, start:stop], view, view, step_mask, 0.5)
        ref = reference(plan, q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], step_mask, 0.5)
        m = None if mask is None else mask[:, start:stop]
        torch.testing.assert_close(real_rows(out, m), real_rows(ref, m), atol=1e-5, rtol=1e-5)
        start = stop


@pytest.mark.parametrize("steps", [[17], [1] * 17, [5, 1, 7, 1, 3]])
@pytest.mark.parametrize("padded", [False, True])
def test_the_cache_sums_exactly_the_evicted_tokens(steps, padded):
    plan = PLANS["mixed-windows"]
    T = sum(steps)
    q, k, v = rand_qkv(plan, 2, T, seed=5)
    mask = left_padding_mask([T, T - 3], T) if padded else None
    layer, start = SplitKVLayer(plan), 0
    for n in steps:
        stop = start + n
        view, _ = layer.update(k[:, :, start:stop], v[:, :, start:stop])
        attend(plan, q[:, :, start:stop], view, view, None if mask is None else mask[:, :stop], 1.0)
        start = stop
    for s in layer.streams:
        g = s.group
        if not g.compensate:
            assert s.comp_k is None and s.comp_nbytes == 0
            continue
        for b, pad in enumerate([0, 3] if padded else [0, 0]):
            last = T - pad - 1
            gone = list(range(pad + g.sink, pad + last - g.window + 1))  # slots of ranks sink .. last - window
            assert len(gone) == dropped_count(last, g.sink, g.window)
            want = k[b, g.start : g.stop, gone].sum(1) if gone else torch.zeros_like(s.comp_k[b])
            torch.testing.assert_close(s.comp_k[b], want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(s.comp_v[b], v[b, g.start : g.stop, gone].sum(1) if gone else 0 * want)
        assert s.comp_k.dtype == torch.float32 and s.size <= g.sink + g.window


def test_bf16_cache_sums_in_float32_and_bytes_count_them():
    plan = PLANS["mixed-flags"]
    q, k, v = (x.bfloat16() for x in rand_qkv(plan, 1, 20))
    layer = SplitKVLayer(plan)
    view, _ = layer.update(k, v)
    out = attend(plan, q, view, view, None, 0.5)
    ref = reference(plan, q.float(), k.float(), v.float(), None, 0.5)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    (comp,) = [s for s in layer.streams if s.group.compensate]
    assert comp.comp_k.dtype == torch.float32
    D = k.shape[-1]
    tokens = 1 * 20 + 1 * 7 + 2 * 7  # retrieval, plain group, compensated group (sink + window = 7)
    assert layer.kv_bytes_used() == 2 * D * 2 * tokens + 2 * (2 * D * 4)


def test_kernels_refuse_compensated_plans_by_name():
    from headpolicy.codegen.ops import backend
    from headpolicy.errors import UnsupportedPolicyError

    plan = PLANS["mixed-flags"]
    q, k, v = rand_qkv(plan, 1, 9)
    with backend("triton"), pytest.raises(UnsupportedPolicyError, match="layer 0: the generated Triton kernels"):
        attend(plan, q, k, v, None, 0.5)
    layer = SplitKVLayer(plan)
    view, _ = layer.update(k, v)
    attend(plan, q, view, view, None, 0.5)
    view, _ = layer.update(k[:, :, :1], v[:, :, :1])
    with backend("triton"), pytest.raises(UnsupportedPolicyError, match="do not implement the compensation token"):
        attend(plan, q[:, :, :1], view, view, None, 0.5)


# ---- an applied model ---------------------------------------------------------------------------------
def compensated_policy(model, sink=3, window=5):
    """Every layer mixes: layer 0 retrieval + compensated, layer 1 compensated + not (own window)."""
    from headpolicy import HeadPolicy, describe_model

    rules = [[None, (sink, window)], [(sink, window), (1, 4, False)]]
    return HeadPolicy.from_rules(describe_model(model), rules, defaults=(sink, window), compensate=True)


@pytest.mark.parametrize("batch_lengths", [[11], [11, 7]])
def test_applied_model_matches_reference_every_step(batch_lengths):
    import copy

    from transformers import DynamicCache

    from headpolicy import SplitKVCache, apply
    from headpolicy.runtime.attention import REFERENCE_ATTN_NAME
    from tests.conftest import tiny_llama

    base = tiny_llama(layers=2, seed=1)
    policy = compensated_policy(base)
    model = apply(copy.deepcopy(base), policy)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(REFERENCE_ATTN_NAME)
    T0 = max(batch_lengths)
    ids = torch.randint(3, 97, (len(batch_lengths), T0))
    mask = torch.zeros_like(ids)
    for b, n in enumerate(batch_lengths):
        mask[b, T0 - n :] = 1
    cache, ref_cache = SplitKVCache.for_model(model), DynamicCache()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    step_ids = ids
    with torch.no_grad():
        for step in range(16):
            out = model(step_ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
            exp = ref(step_ids, attention_mask=mask, position_ids=pos, cache=ref_cache, use_cache=True)
            real = mask[:, -step_ids.shape[1] :].bool()
            diff = (out.logits - exp.logits).abs()[real].max().item()
            assert diff <= 1e-4, f"step {step}: max |logit diff| {diff}"
            step_ids = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
            pos = pos[:, -1:] + 1
    if len(batch_lengths) == 1:  # the sums count as compensation_bytes; the counts are not stored
        assert cache.kv_bytes_used() == policy.kv_bytes(cache.get_seq_length())
    # the reference differs from the same policy without compensation: the token is attended
    plain = copy.deepcopy(base)
    apply(plain, policy.replace(compensate=False))
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-4)


def test_generate_with_a_compensated_policy_matches_the_reference():
    import copy

    from transformers import DynamicCache

    from headpolicy import apply
    from headpolicy.runtime.attention import REFERENCE_ATTN_NAME
    from tests.conftest import tiny_llama

    base = tiny_llama(layers=2, seed=2)
    model = apply(copy.deepcopy(base), compensated_policy(base))
    ref = copy.deepcopy(model)
    ref.set_attn_implementation(REFERENCE_ATTN_NAME)
    ids = torch.randint(3, 97, (1, 9))
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), ref.generate(ids, cache=DynamicCache(), **kw))
