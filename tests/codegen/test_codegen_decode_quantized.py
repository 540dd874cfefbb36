"""The generated decode kernel over quantised heads (codes + float16 scales read directly) vs references.

References: codegen/reference.decode_quantized_reference (dense, every part dequantised whole)
and, through a real SplitKVLayer, policies/rule.reference_attention on the stored values.
"""

import pytest
import torch
from codegen_helpers import TOL, kernel_devices

from headpolicy.codegen.reference import decode_quantized_reference
from headpolicy.policies.precision import quantize
from headpolicy.policies.rule import reference_attention, token_ranks
from headpolicy.runtime.attention import decode_quantized_op_args
from headpolicy.runtime.cache import SplitKVLayer
from tests.conftest import attend, make_plan, stored_kv

PLANS = {
    # native + int8 + int4 retrieval heads, a native, an int8 and an int4 streaming group (one with sink 0)
    "mixed-gqa": make_plan(3, [(1, 3, 5), (1, 2, 4, 8), (1, 0, 3, 4)], 2, retrieval_bits=((1, 8), (1, 4)),
                           kv_group=4, kv_residual=3),  # fmt: skip
    "quantised-only-mha": make_plan(1, [(1, 2, 5, 8)], 1, retrieval_bits=((1, 4),), kv_group=2, kv_residual=0),
}


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("padded", [False, True])
def test_quantised_decode_kernel_over_split_cache_matches_dense_reference(triton_backend, device, plan_name, padded):
    """Prefill 9 tokens, then decode 8 (rings wrap, groups age out of the residual); each step the
    kernel equals the dense reference on what the cache stores, dequantised."""
    plan = PLANS[plan_name]
    B, D, T, scale = 2, 16, 17, 0.4
    Hq = plan.num_kv_heads * plan.group_size
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, Hq, T, D, generator=g).to(device)
    k = torch.randn(B, plan.num_kv_heads, T, D, generator=g).to(device)
    v = torch.randn(B, plan.num_kv_heads, T, D, generator=g).to(device)
    k[..., 5] *= 8  # an outlier channel
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    if padded:
        mask[1, :3] = 0
    retrieval, sink, window = plan.table_tensors(device)
    layer = SplitKVLayer(plan)
    with torch.no_grad():
        view, _ = layer.update(k[:, :, :9], v[:, :, :9])
        attend(plan, q[:, :, :9], view, view, mask[:, :9], scale)  # the prefill kernel; commits
        for t in range(9, T):
            view, _ = layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])
            via_runtime = attend(plan, q[:, :, t : t + 1], view, view, mask[:, : t + 1], scale)  # commits token t
            ranks = token_ranks(mask[:, : t + 1], B, t + 1, device=device)
            args = decode_quantized_op_args(plan, q[:, :, t : t + 1], layer, ranks[:, -1:], ranks if padded else None,
                                            scale)  # fmt: skip
            out = torch.ops.headpolicy.decode_attention_quantized(*args)
            K, V = stored_kv(layer, mask[:, : t + 1].bool().cpu(), torch.float32)
            ref = reference_attention(q[:, :, t : t + 1], K.to(device), V.to(device), retrieval=retrieval, sink=sink,
                                      window=window, key_valid=mask[:, : t + 1].bool(), scale=scale)  # fmt: skip
            torch.testing.assert_close(out, ref, **TOL[torch.float32], msg=f"step {t}")
            torch.testing.assert_close(via_runtime, ref, **TOL[torch.float32], msg=f"runtime step {t}")
            torch.testing.assert_close(decode_quantized_reference(*args), ref, **TOL[torch.float32])
        assert all(p.quantized_tokens > 0 for p in layer.qparts)


def synthetic(B, G, D, dtype, device, *, R=1, coded=20, tail=5, kv_group=4, bits=(8, 4), seed=0):
    """Op arguments: a native retrieval part (padded rows), quantised retrieval parts of `coded` tokens
    plus a `tail`-token residual, a native streaming group and a quantised streaming group with
    empty slots; the last row is a padding query."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: (torch.randn(*shape, generator=g) * 2).to(device, dtype)
    T = coded + tail
    q_rank = torch.tensor([T - 1] + [T - 5] * (B - 2) + [-1], device=device)[:B]
    full_rank = torch.arange(T, device=device).repeat(B, 1)
    full_rank[1:] -= 4  # rows >= 1 left-padded by 4
    full_rank[full_rank < 0] = -1
    quant, retrieval, qbits, qsink, qwindow = [], [], [], [], []
    for b in bits:  # one retrieval part per bits value, 2 heads each
        k, v = rnd(B, 2, T, D), rnd(B, 2, T, D)
        qk = quantize(k[:, :, :coded], b, kv_group, per_channel=True)
        qv = quantize(v[:, :, :coded], b, kv_group, per_channel=False)
        quant += [*qk.tensors(), *qv.tensors(), full_rank[:, :coded], k[:, :, coded:], v[:, :, coded:],
                  full_rank[:, coded:]]  # fmt: skip
        retrieval.append(True), qbits.append(b), qsink.append(0), qwindow.append(1)
    ring = torch.tensor([[0, 1, 2] + [T - 1 - i for i in range(5)]] + [[0, 1, 2] + [T - 9 - i for i in range(4)] + [-1]]
                        * (B - 1), device=device)  # fmt: skip  # sink 3 + ring 5, one empty slot in padded rows
    for b in bits:
        qk = quantize(rnd(B, 1, 8, D), b, kv_group, per_channel=False)
        qv = quantize(rnd(B, 1, 8, D), b, kv_group, per_channel=False)
        empty = torch.zeros(B, 1, 0, D, device=device, dtype=dtype)
        quant += [*qk.tensors(), *qv.tensors(), ring, empty, empty, ring[:, :0]]
        retrieval.append(False), qbits.append(b), qsink.append(3), qwindow.append(5)
    Hkv = R + 2 * len(bits) + 1 + len(bits)
    return [rnd(B, Hkv * G, 1, D), q_rank, rnd(B, R, T, D), rnd(B, R, T, D), full_rank,
            [rnd(B, 1, 8, D)], [rnd(B, 1, 8, D)], [ring], [3], [5],
            quant, retrieval, qbits, qsink, qwindow, kv_group, 0.3]  # fmt: skip


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("num_splits", [1, 2, 3])
def test_quantised_decode_split_k_across_codes_and_residual(triton_backend, device, num_splits):
    """20 coded + 5 residual tokens in blocks of 16: splits cross the coded/residual boundary."""
    from headpolicy.codegen.kernels import decode_quantized_triton

    args = synthetic(3, 2, 16, torch.float32, device)
    out = decode_quantized_triton(*args, num_splits=num_splits)
    torch.testing.assert_close(out, decode_quantized_reference(*args), **TOL[torch.float32])
    assert out[-1].abs().max() == 0  # the padding query row is zeros


@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantised_decode_half_precision_ragged_channel_groups(triton_backend, device, dtype):
    """head_dim 24 with groups of 16 channels: each token's second value group is 8 channels short."""
    args = synthetic(2, 3, 24, dtype, device, coded=16, tail=3, kv_group=16, seed=1)
    out = torch.ops.headpolicy.decode_attention_quantized(*args)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), decode_quantized_reference(*args).float(), **TOL[dtype])


@pytest.mark.parametrize("device", kernel_devices())
def test_quantised_decode_without_plain_parts(triton_backend, device):
    args = synthetic(2, 1, 16, torch.float32, device, R=0, bits=(4,), seed=2)
    args[2], args[3] = args[2][:, :0], args[3][:, :0]  # no 16-bit retrieval heads
    args[5:10] = [], [], [], [], []  # no 16-bit streaming group
    args[0] = args[0][:, : 3 * 1]
    out = torch.ops.headpolicy.decode_attention_quantized(*args)
    torch.testing.assert_close(out, decode_quantized_reference(*args), **TOL[torch.float32])


def test_the_op_names_what_is_wrong():
    args = synthetic(2, 1, 16, torch.float32, "cpu")  # 2 quantised retrieval parts, then 2 streaming ones
    with pytest.raises(ValueError, match="4 quantised parts need 40 tensors"):
        torch.ops.headpolicy.decode_attention_quantized(*args[:10], args[10][:-1], *args[11:])
    bad = list(args)
    bad[11] = [True, False, True, False]
    with pytest.raises(ValueError, match="retrieval parts must come before streaming ones"):
        torch.ops.headpolicy.decode_attention_quantized(*bad)
