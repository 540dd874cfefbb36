"""Generated decode kernels over the split KV cache vs the references."""

import pytest
import torch
from codegen_helpers import TOL, kernel_devices

from headpolicy.codegen.reference import decode_reference
from headpolicy.policies.rule import reference_attention, token_ranks
from headpolicy.runtime.attention import decode_op_args
from headpolicy.runtime.cache import SplitKVLayer
from tests.conftest import attend, make_plan

PLANS = {
    "mixed-gqa": make_plan(1, [(2, 3, 5), (1, 0, 1)], 2),
    "all-streaming-mha": make_plan(0, [(2, 2, 4)], 1),
}


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("padded", [False, True])
def test_decode_over_split_cache_matches_dense_reference(triton_backend, device, plan_name, padded):
    """Prefill 11 tokens, then decode 5 (the rings wrap); each step: commit, then the op attends."""
    plan = PLANS[plan_name]
    B, D, T = 2, 16, 16
    Hq = plan.num_kv_heads * plan.group_size
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, Hq, T, D, generator=g).to(device)
    k = torch.randn(B, plan.num_kv_heads, T, D, generator=g).to(device)
    v = torch.randn(B, plan.num_kv_heads, T, D, generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    if padded:
        mask[1, :3] = 0  # row 1 is left-padded by 3 slots
    retrieval, sink, window = plan.table_tensors(device)
    layer = SplitKVLayer(plan)
    with torch.no_grad():
        view, _ = layer.update(k[:, :, :11], v[:, :, :11])
        attend(plan, q[:, :, :11], view, view, mask[:, :11], 0.4)  # PyTorch prefill; commits the streaming part
        for t in range(11, T):
            view, _ = layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
            attend(plan, q[:, :, t : t + 1], view, view, mask[:, : t + 1], 0.4)  # commits token t
            ranks = token_ranks(mask[:, : t + 1], B, t + 1, device=device)
            k_rank = ranks if padded else None
            out = torch.ops.headpolicy.decode_attention(
                *decode_op_args(plan, q[:, :, t : t + 1], layer, ranks[:, -1:], k_rank, 0.4)
            )
            ref = reference_attention(
                q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1],
                retrieval=retrieval, sink=sink, window=window, key_valid=mask[:, : t + 1].bool(), scale=0.4,
            )  # fmt: skip
            torch.testing.assert_close(out, ref, **TOL[torch.float32])


def synthetic(B, G, D, R, T, groups, dtype, device, seed=0):
    """Hand-made split cache: padded retrieval ranks, group buffers with empty (-1) slots.

    groups: list of (heads, sink, window, sink ranks [B][Ns], ring ranks [B][Nr])."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    Hkv = R + sum(x[0] for x in groups)
    q = rnd(B, Hkv * G, 1, D)
    q_rank = torch.tensor([T - 1] + [T - 5] * (B - 2) + [-1], device=device)[:B]  # last row: padding query
    full_rank = torch.arange(T, device=device).repeat(B, 1)
    full_rank[1:] -= 4  # rows >= 1 are left-padded by 4
    full_rank[full_rank < 0] = -1
    args = [q, q_rank, rnd(B, R, T, D), rnd(B, R, T, D), full_rank, [], [], [], [], [], 0.3]
    for heads, sink, window, sr, rr in groups:
        # one buffer per group: the sink slots, then the ring (ranks tell them apart)
        rank = torch.tensor([a + b for a, b in zip(sr, rr, strict=True)], dtype=torch.long, device=device).view(B, -1)
        args[5].append(rnd(B, heads, rank.shape[1], D))
        args[6].append(rnd(B, heads, rank.shape[1], D))
        args[7].append(rank)
        args[8].append(sink)
        args[9].append(window)
    return args


def _groups(B, T):
    ring = [[T - 1 - i for i in range(5)]] + [[T - 5 - i for i in range(4)] + [-1]] * (B - 1)
    return [
        (2, 3, 5, [[0, 1, 2]] * B, ring),  # sink + a ring with one empty slot in padded rows
        (1, 0, 1, [[]] * B, [[T - 1]] + [[T - 5]] * (B - 1)),  # sink=0, window=1
    ]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_decode_split_k_matches_reference(triton_backend, device, num_splits):
    from headpolicy.codegen.kernels import decode_triton

    B, G, D, R, T = 3, 2, 16, 2, 45
    args = synthetic(B, G, D, R, T, _groups(B, T), torch.float32, device)
    out = decode_triton(*args, num_splits=num_splits)
    ref = decode_reference(*args)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert out[-1].abs().max() == 0  # the padding query row is zeros


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_precision_odd_head_dim(triton_backend, device, dtype):
    B, G, D, R, T = 2, 3, 24, 1, 21
    args = synthetic(B, G, D, R, T, _groups(B, T), dtype, device, seed=1)
    out = torch.ops.headpolicy.decode_attention(*args)
    ref = decode_reference(*args)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("device", kernel_devices())
def test_decode_without_retrieval_heads_and_without_full_ranks(triton_backend, device):
    B, G, D, T = 2, 1, 16, 9
    args = synthetic(B, G, D, 0, T, _groups(B, T), torch.float32, device, seed=2)
    out = torch.ops.headpolicy.decode_attention(*args)
    torch.testing.assert_close(out, decode_reference(*args), **TOL[torch.float32])
    args = synthetic(1, 2, D, 2, T, [], torch.float32, device, seed=4)  # retrieval only, no padding
    args[4] = None  # slot t has rank t
    out = torch.ops.headpolicy.decode_attention(*args)
    torch.testing.assert_close(out, decode_reference(*args), **TOL[torch.float32])
