"""Op-level checks: every prefill/decode path of runtime/attention.py against the dense masked reference.

Paths (attention.py's module docstring): one causal call for a layer whose sequence is shorter
than every sink + window (`fused`), causal + `band_attention` blocks (`band`), a left-padded
batch row by row (`rows`), blocks with rank masks (`local`: a chunk on top of a cache, or
padding that is not on the left), and decode over the split cache.
"""

import pytest
import torch

from headpolicy.policies.rule import reference_attention, token_ranks
from headpolicy.runtime import attention
from headpolicy.runtime.cache import SplitKVLayer
from tests.conftest import attend, make_plan

PLANS = {
    "mixed": make_plan(1, [(2, 3, 5)], 2),
    "two-groups": make_plan(1, [(1, 0, 1), (1, 4, 9)], 3),
    "three-groups": make_plan(1, [(1, 0, 3), (1, 2, 6), (2, 5, 2)], 2),
    "all-streaming": make_plan(0, [(2, 2, 4)], 1),
    "all-retrieval": make_plan(2, [], 2),
}
PATHS = ("fresh_prefill", "band_attention", "padded_prefill", "local_blocks", "decode")


@pytest.fixture
def paths(monkeypatch):
    """Small query blocks (several blocks, a ragged last one), and a count of the paths that ran."""
    monkeypatch.setattr(attention, "query_block", lambda window: 3)
    ran = dict.fromkeys(PATHS, 0)
    for name in PATHS:
        real = getattr(attention, name)

        def counted(*a, _name=name, _real=real, **kw):
            ran[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(attention, name, counted)
    return ran


def left_padding_mask(lengths, T):
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
    return mask


def reference(plan, q, k, v, mask, scale):
    retrieval, sink, window = plan.table_tensors()
    return reference_attention(q, k, v, retrieval=retrieval, sink=sink, window=window, key_valid=mask, scale=scale)


def rand_qkv(plan, B, S, D=8, seed=0, T=None):
    g = torch.Generator().manual_seed(seed)
    H = plan.num_kv_heads
    q = torch.randn(B, H * plan.group_size, S, D, generator=g)
    k = torch.randn(B, H, T or S, D, generator=g)
    v = torch.randn(B, H, T or S, D, generator=g)
    return q, k, v


def real_rows(out, mask):
    """Compare only real query rows (padding rows are zeros in both, but keep the check explicit)."""
    return out if mask is None else out * mask[:, -out.shape[2] :][:, None, :, None]


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("S", [1, 7, 23, 40])
@pytest.mark.parametrize("padded", [False, True])
def test_dense_path_matches_reference(paths, plan_name, S, padded):
    plan = PLANS[plan_name]
    q, k, v = rand_qkv(plan, 2, S)
    mask = left_padding_mask([S, max(1, S - 4)], S) if padded else None
    out = attend(plan, q, k, v, mask, 0.3)
    ref = reference(plan, q, k, v, mask, 0.3)
    torch.testing.assert_close(real_rows(out, mask), real_rows(ref, mask), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
    longest = S if plan.causal_below is None else plan.causal_below
    band = S > longest  # some query of some streaming group is past its sink + window
    assert paths["padded_prefill"] == (padded and S > 4)  # S = 1: both rows hold one real token, no padding
    assert paths["fresh_prefill"] >= 1 and paths["local_blocks"] == 0
    assert (paths["band_attention"] > 0) == band


@pytest.mark.parametrize("plan_name", ["mixed", "three-groups"])
@pytest.mark.parametrize("S", [1, 4, 17])
@pytest.mark.parametrize("padded", [False, True])
def test_queries_after_uncached_keys_match_reference(paths, plan_name, S, padded):
    """Plain K/V holding every token and queries in the last S slots (an applied model on a DynamicCache)."""
    plan, T = PLANS[plan_name], 29
    q, k, v = rand_qkv(plan, 2, S, T=T, seed=2)
    mask = left_padding_mask([T, T - 6], T) if padded else None
    out = attend(plan, q, k, v, mask, 0.7)
    ref = reference(plan, q, k, v, mask, 0.7)
    torch.testing.assert_close(real_rows(out, mask), real_rows(ref, mask), atol=1e-5, rtol=1e-5)
    assert paths["band_attention"] > 0


@pytest.mark.parametrize("plan_name", ["mixed", "three-groups", "all-retrieval"])
def test_padding_not_on_the_left_takes_the_rank_path(paths, plan_name):
    plan, S = PLANS[plan_name], 26
    q, k, v = rand_qkv(plan, 2, S, seed=3)
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, 19:] = 0  # right padding
    out = attend(plan, q, k, v, mask, 0.5)
    ref = reference(plan, q, k, v, mask, 0.5)
    torch.testing.assert_close(out * mask[:, None, :, None], ref * mask[:, None, :, None], atol=1e-5, rtol=1e-5)
    assert paths["padded_prefill"] == 0 and paths["local_blocks"] == len(plan.groups)


@pytest.mark.parametrize("plan_name", ["mixed", "two-groups", "three-groups", "all-streaming"])
@pytest.mark.parametrize(
    "steps", [[9, 1, 1, 1, 3, 1, 7, 1, 1, 1, 1, 1, 2], [1] * 25, [30, 1, 1], [20, 6, 1, 1, 9, 1, 13]]
)
@pytest.mark.parametrize("padded", [False, True])
def test_split_cache_matches_reference_step_by_step(paths, plan_name, steps, padded):
    """Prefill, decode past the window and chunked prefill through the split cache equal dense attention."""
    plan = PLANS[plan_name]
    T = sum(steps)
    q, k, v = rand_qkv(plan, 2, T, seed=1)
    # row 1 is left-padded by 3 slots inside the first step (generate's layout)
    mask = left_padding_mask([T, T - 3], T) if padded else None
    layer = SplitKVLayer(plan)
    start = 0
    for n in steps:
        stop = start + n
        view, _ = layer.update(k[:, :, start:stop], v[:, :, start:stop])
        step_mask = None if mask is None else mask[:, :stop]
        out = attend(plan, q[:, :, start:stop], view, view, step_mask, 0.5)
        ref = reference(plan, q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], step_mask, 0.5)
        m = None if mask is None else mask[:, start:stop]
        torch.testing.assert_close(real_rows(out, m), real_rows(ref, m), atol=1e-5, rtol=1e-5)
        start = stop
    chunks = sum(n > 1 for n in steps[1:])
    assert paths["decode"] == sum(n == 1 for n in steps)
    assert paths["local_blocks"] == chunks * len(plan.groups)  # chunks on the cache: rank masks


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """Decode packs each KV head's queries on one thread and keeps heads apart on more."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("plan_name", ["mixed", "three-groups", "all-retrieval"])
@pytest.mark.parametrize("padded", [False, True])
def test_decode_matches_reference_on_any_thread_count(paths, threads, plan_name, padded):
    plan, steps = PLANS[plan_name], [12] + [1] * 15
    T = sum(steps)
    q, k, v = rand_qkv(plan, 2, T, seed=4)
    mask = left_padding_mask([T, T - 5], T) if padded else None
    layer, start = SplitKVLayer(plan), 0
    for n in steps:
        stop = start + n
        view, _ = layer.update(k[:, :, start:stop], v[:, :, start:stop])
        step_mask = None if mask is None else mask[:, :stop]
        out = attend(plan, q[:, :, start:stop], view, view, step_mask, 0.4)
        ref = reference(plan, q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop], step_mask, 0.4)
        m = None if mask is None else mask[:, start:stop]
        torch.testing.assert_close(real_rows(out, m), real_rows(ref, m), atol=1e-5, rtol=1e-5)
        start = stop
    assert paths["decode"] == 15


def test_streaming_buffers_never_exceed_sink_plus_window():
    plan = PLANS["two-groups"]
    layer = SplitKVLayer(plan)
    q, k, v = rand_qkv(plan, 1, 40)
    for t in range(40):
        view, _ = layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
        attend(plan, q[:, :, t : t + 1], view, view, None, 1.0)
        for stream in layer.streams:
            g = stream.group
            assert stream.size == min(t + 1, g.sink + g.window)
            assert stream.kv.capacity <= g.sink + g.window
            # the buffer holds exactly the sink tokens and the last `window` tokens after them
            expected = set(range(min(t + 1, g.sink))) | set(range(max(g.sink, t + 1 - g.window), t + 1))
            assert set(stream.rank[0].tolist()) == expected
    assert layer.keys.shape[2] == 40


def test_ranks_are_worked_out_once_per_forward(monkeypatch):
    """Layers of one forward share the padding mask tensor, so they share its ranks."""
    calls = []
    real = attention.token_ranks
    monkeypatch.setattr(attention, "token_ranks", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    plan = PLANS["mixed"]
    layers = [SplitKVLayer(plan)]
    layers.append(SplitKVLayer(plan, layers[0].memo))
    q, k, v = rand_qkv(plan, 2, 12)
    mask = left_padding_mask([12, 8], 12)
    for S in (10, 1, 1):  # a prefill, then two decode steps: a new mask tensor each forward
        T = layers[0].seen + S
        step_mask = mask[:, :T]
        for layer in layers:
            view, _ = layer.update(k[:, :, T - S : T], v[:, :, T - S : T])
            attend(plan, q[:, :, T - S : T], view, view, step_mask, 0.5)
    assert len(calls) == 3


def test_left_padding_counts():
    assert attention.left_padding(token_ranks(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), 2, 4)) == [2, 0]
    assert attention.left_padding(token_ranks(torch.tensor([[1, 1, 0, 1]]), 1, 4)) is None


def test_token_ranks_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert token_ranks(mask, 2, 5).tolist() == [[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert token_ranks(None, 1, 3).tolist() == [[0, 1, 2]]
