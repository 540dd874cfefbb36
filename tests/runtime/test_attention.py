"""Op-level checks: the chunked/split-cache paths against the dense masked reference."""

import pytest
import torch

from headpolicy.policies.rule import reference_attention, token_ranks
from headpolicy.runtime import attention
from headpolicy.runtime.cache import SplitKVLayer
from tests.conftest import attend, make_plan

PLANS = {
    "mixed": make_plan(1, [(2, 3, 5)], 2),
    "two-groups": make_plan(1, [(1, 0, 1), (1, 4, 9)], 3),
    "all-streaming": make_plan(0, [(2, 2, 4)], 1),
    "all-retrieval": make_plan(2, [], 2),
}


def left_padding_mask(lengths, T):
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
    return mask


def reference(plan, q, k, v, mask, scale):
    retrieval, sink, window = plan.table_tensors()
    return reference_attention(q, k, v, retrieval=retrieval, sink=sink, window=window, key_valid=mask, scale=scale)


def rand_qkv(plan, B, S, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = plan.num_kv_heads
    q = torch.randn(B, H * plan.group_size, S, D, generator=g)
    k = torch.randn(B, H, S, D, generator=g)
    v = torch.randn(B, H, S, D, generator=g)
    return q, k, v


def real_rows(out, mask):
    """Compare only real query rows (padding rows are zeros in both, but keep the check explicit)."""
    return out if mask is None else out * mask[:, None, :, None]


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("S", [1, 7, 23])
@pytest.mark.parametrize("padded", [False, True])
def test_dense_path_matches_reference(monkeypatch, plan_name, S, padded):
    monkeypatch.setattr(attention, "CHUNK", 5)  # several blocks, ragged last block
    plan = PLANS[plan_name]
    q, k, v = rand_qkv(plan, 2, S)
    mask = left_padding_mask([S, max(1, S - 4)], S) if padded else None
    out = attend(plan, q, k, v, mask, 0.3)
    ref = reference(plan, q, k, v, mask, 0.3)
    torch.testing.assert_close(real_rows(out, mask), real_rows(ref, mask), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("plan_name", ["mixed", "two-groups", "all-streaming"])
@pytest.mark.parametrize("steps", [[9, 1, 1, 1, 3, 1, 7, 1, 1, 1, 1, 1, 2], [1] * 25, [30, 1, 1]])
@pytest.mark.parametrize("padded", [False, True])
def test_split_cache_matches_reference_step_by_step(monkeypatch, plan_name, steps, padded):
    """Prefill, decode and chunked prefill through the split cache equal dense attention over all tokens."""
    monkeypatch.setattr(attention, "CHUNK", 4)
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
            # the buffer holds exactly the sink tokens and the last `window` tokens after them
            expected = set(range(min(t + 1, g.sink))) | set(range(max(g.sink, t + 1 - g.window), t + 1))
            assert set(stream.rank[0].tolist()) == expected
    assert layer.keys.shape[2] == 40


def test_token_ranks_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert token_ranks(mask, 2, 5).tolist() == [[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert token_ranks(None, 1, 3).tolist() == [[0, 1, 2]]
