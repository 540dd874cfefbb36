"""Generated prefill kernel vs the dense reference (runtime/reference.py), and block skipping."""

import pytest
import torch
import torch.nn.functional as F
from codegen_helpers import TOL, kernel_devices

from headpolicy.codegen.reference import prefill_reference
from headpolicy.policies.rule import headpolicy_mask, token_ranks

R = (True, 0, 1)  # a retrieval head


def S_(sink, window):  # a streaming head
    return (False, sink, window)


# name: (B, Hkv, G, S, T, D, table, pads, dtype)
CASES = {
    "gqa-odd-padded-sink0-window1": (2, 3, 2, 37, 37, 16, [R, S_(4, 7), S_(0, 1)], [0, 5], torch.float32),
    "all-streaming-window-gt-length": (1, 2, 3, 19, 19, 16, [S_(2, 64), S_(0, 40)], None, torch.float32),
    "sink-gt-length-all-padding-row": (2, 2, 1, 23, 23, 16, [S_(30, 2), R], [0, 23], torch.float32),
    "queries-last-S-of-T": (2, 2, 2, 9, 33, 16, [S_(3, 5), R], [0, 32], torch.float32),
    "long-window-unmasked-blocks": (2, 2, 2, 70, 70, 16, [S_(3, 40), R], [0, 17], torch.float32),
    "single-token": (2, 2, 2, 1, 1, 16, [S_(1, 1), R], None, torch.float32),
    "head-dim-24-fp16": (1, 2, 2, 21, 21, 24, [R, S_(1, 4)], None, torch.float16),
    "bf16-padded": (1, 2, 2, 18, 18, 16, [S_(2, 3), R], [2], torch.bfloat16),
}


def make_inputs(B, Hkv, G, S, T, D, pads, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, S, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(device, dtype)
    pad = None if pads is None else torch.tensor(pads, device=device)
    return q, k, v, pad


def table(rows):
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_kernel_matches_reference(triton_backend, device, case):
    B, Hkv, G, S, T, D, rows, pads, dtype = CASES[case]
    q, k, v, pad = make_inputs(B, Hkv, G, S, T, D, pads, dtype, device)
    retrieval, sink, window = table(rows)
    out = torch.ops.headpolicy.prefill_attention(q, k, v, pad, retrieval, sink, window, 0.37)
    ref = prefill_reference(q, k, v, pad, retrieval, sink, window, 0.37)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def expected_tiles(B, Hkv, G, S, T, rows, pads, bm, bn):
    """Which (query block, key block) tiles hold at least one allowed (query, key) pair: [B*Hq, nqb, nkb]."""
    valid = None if pads is None else torch.arange(T)[None, :] >= torch.tensor(pads)[:, None]
    k_rank = token_ranks(valid, B, T)
    retrieval, sink, window = (torch.tensor(x) for x in table(rows))
    mask = headpolicy_mask(k_rank[:, T - S :], k_rank, retrieval, sink, window)  # [B, Hkv, S, T]
    nqb, nkb = -(-S // bm), -(-T // bn)
    mask = F.pad(mask, (0, nkb * bn - T, 0, nqb * bm - S))
    tiles = mask.view(B, Hkv, nqb, bm, nkb, bn).any(dim=5).any(dim=3)  # [B, Hkv, nqb, nkb]
    return tiles.repeat_interleave(G, dim=1).reshape(B * Hkv * G, nqb, nkb).int()


@pytest.mark.parametrize("device", kernel_devices())
def test_prefill_visits_only_blocks_with_allowed_keys(triton_backend, device):
    """Under TRACE every key-block load is counted: each needed block once, every other block never."""
    from headpolicy.codegen.kernels import prefill_triton

    B, Hkv, G, S, T, D, bm, bn = 2, 3, 1, 70, 70, 16, 16, 16
    rows, pads = [R, S_(2, 5), S_(0, 1)], [0, 9]
    q, k, v, pad = make_inputs(B, Hkv, G, S, T, D, pads, torch.float32, device)
    retrieval, sink, window = table(rows)
    trace = torch.zeros(B * Hkv * G, -(-S // bm), -(-T // bn), dtype=torch.int32, device=device)
    out = prefill_triton(q, k, v, pad, retrieval, sink, window, 0.25, block_m=bm, block_n=bn, trace=trace)
    want = expected_tiles(B, Hkv, G, S, T, rows, pads, bm, bn)
    torch.testing.assert_close(trace.cpu(), want, atol=0, rtol=0)
    # streaming heads skip most of the causal triangle
    per_head = trace.cpu().view(B, Hkv, -1).sum(-1)
    assert (per_head[:, 1:] < per_head[:, :1]).all(), per_head
    ref = prefill_reference(q, k, v, pad, retrieval, sink, window, 0.25)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
