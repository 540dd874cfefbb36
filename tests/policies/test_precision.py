"""The per-head precision rule (policies/precision.py): quantisation error, packing, exact bytes."""

import pytest
import torch

from headpolicy.policies import precision
from headpolicy.policies.precision import Quantized, kv_head_bytes, quantize, quantized_bytes, quantized_tokens


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("per_channel", "group", "dim"), [(True, 4, 16), (True, 32, 10), (False, 8, 16),
                                                           (False, 6, 14), (False, 32, 16)])  # fmt: skip
def test_quantisation_error_is_what_the_bits_and_scales_allow(bits, per_channel, group, dim):
    """|x - x_hat| <= half a step (or half a float16 ulp of the zero point) in every group, and the
    step is the group's range over 2**bits - 1: the error the bits allow, no more."""
    g = torch.Generator().manual_seed(bits + group)
    x = torch.randn(2, 3, 64, dim, generator=g) * 3
    x[..., 1] *= 20  # an outlier channel
    q = quantize(x, bits, group, per_channel=per_channel)
    err = (q.dequantize() - x).abs()
    assert (err <= q.error_bound()).all()
    # the step is the range / levels, rounded up to float16 at most by a float16 ulp
    levels = 2**bits - 1
    if per_channel:
        xg = x.reshape(2, 3, 64 // group, group, dim)
        span = xg.amax(-2) - xg.amin(-2)
    else:
        pad = -dim % group
        xg = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], -1).reshape(2, 3, 64, -1, group)
        span = xg.amax(-1) - xg.amin(-1)
    assert torch.allclose(q.scale.float(), span / levels, rtol=2e-3, atol=1e-4)
    rel = err.max() / (x.max() - x.min())
    assert rel <= (0.5 / levels) * 1.01  # never worse than one global scale would be
    assert q.codes.dtype == torch.uint8 and q.scale.dtype == q.zero.dtype == torch.float16


def test_constant_groups_and_large_values_are_exact_or_bounded():
    x = torch.full((1, 1, 8, 4), 2.5)
    q = quantize(x, 4, 8, per_channel=True)
    assert torch.equal(q.dequantize(), x)  # scale 0: every code 0, x_hat = zero = 2.5
    big = torch.tensor([[[[-7.0e4, 1.0, 3.0e4, 7.0e4]]]])  # beyond float16: clamped to its range
    q = quantize(big, 8, 4, per_channel=False)
    assert torch.isfinite(q.dequantize()).all()


def test_int4_packs_two_channels_a_byte():
    codes = torch.randint(0, 16, (3, 5, 12), dtype=torch.uint8)
    packed = precision.pack(codes, 4)
    assert packed.shape == (3, 5, 6)
    assert torch.equal(packed[..., 0], codes[..., 0] | (codes[..., 1] << 4))  # channel 2i low, 2i + 1 high
    assert torch.equal(precision.unpack(packed, 4), codes)
    with pytest.raises(ValueError, match="head_dim must be even"):
        precision.pack(codes[..., :5], 4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantized_bytes_equal_the_tensors(bits, per_channel):
    x = torch.randn(2, 3, 24, 10)
    q = quantize(x, bits, 6 if per_channel else 4, per_channel=per_channel)
    assert q.nbytes == 2 * 3 * quantized_bytes(24, 10, bits, q.group, per_channel=per_channel)
    assert isinstance(q.index(torch.tensor([1])), Quantized) and q.index(torch.tensor([1])).codes.shape[0] == 1


def test_kv_head_bytes_by_hand():
    D, e = 16, 4
    assert kv_head_bytes(100, head_dim=D, dtype_bytes=e) == 2 * 100 * D * e
    assert kv_head_bytes(100, head_dim=D, dtype_bytes=e, sink=4, window=8) == 2 * 12 * D * e
    # retrieval, int8, group 32, residual 32: 64 tokens quantised, 36 at full precision
    assert quantized_tokens(100, 32, 32) == 64 and quantized_tokens(63, 32, 32) == 0
    keys = 64 * D + 2 * 2 * (64 // 32) * D  # codes + float16 scale and zero per channel and group
    values = 64 * D + 2 * 2 * 64 * 1  # codes + one scale/zero per token (16 channels, groups of 32)
    assert kv_head_bytes(100, head_dim=D, dtype_bytes=e, bits=8) == keys + values + 2 * 36 * D * e
    # allocated: the residual's buffer at its capacity (residual + group = 64 tokens), as a reserved cache holds it
    assert kv_head_bytes(100, head_dim=D, dtype_bytes=e, bits=8, allocated=True) == keys + values + 2 * 64 * D * e
    assert kv_head_bytes(20, head_dim=D, dtype_bytes=e, bits=8, allocated=True) == 2 * 20 * D * e  # all residual
    # streaming, int4, per-token keys and values, no residual
    kept = 12
    assert kv_head_bytes(100, head_dim=D, dtype_bytes=e, bits=4, sink=4, window=8, group=8) == 2 * (
        kept * D // 2 + 2 * 2 * kept * 2
    )
    with pytest.raises(ValueError, match="both sink and window"):
        kv_head_bytes(10, head_dim=D, dtype_bytes=e, sink=4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("per_channel, tokens, dim", [(True, 48, 16), (True, 32, 16), (False, 7, 16), (False, 7, 24)])
def test_dequantize_is_codes_times_scale_plus_zero_and_fills_a_slice(bits, per_channel, tokens, dim):
    """Whole groups, a token slice of the codes, and ragged channel groups (head dim 24 in groups
    of 16) alike give codes * scale + zero, the scales repeated to each element; `out=` writes
    exactly that into a slice of a larger buffer, leaving the rest as it was."""
    g = torch.Generator().manual_seed(bits + tokens + dim)
    x = torch.randn(2, 3, 48 if per_channel else tokens, dim, generator=g) * 3
    q = quantize(x, bits, 16, per_channel=per_channel)
    if per_channel and tokens < 48:
        q = q.tokens_slice(0, tokens)  # a view into the codes of 48 tokens
    axis = -2 if per_channel else -1
    scale = q.scale.float().repeat_interleave(16, dim=axis)[..., :tokens, :dim]
    zero = q.zero.float().repeat_interleave(16, dim=axis)[..., :tokens, :dim]
    expected = precision.unpack(q.codes, bits).float() * scale + zero
    assert torch.equal(q.dequantize(), expected)
    buffer = torch.full((2, 3, tokens + 5, dim), 7.0)
    assert q.dequantize(out=buffer[:, :, 2 : 2 + tokens]).data_ptr() == buffer[:, :, 2:].data_ptr()
    assert torch.equal(buffer[:, :, 2 : 2 + tokens], expected)
    assert (buffer[:, :, :2] == 7).all() and (buffer[:, :, 2 + tokens :] == 7).all()
    half = torch.zeros(2, 3, tokens, dim, dtype=torch.bfloat16)
    assert torch.equal(q.dequantize(torch.bfloat16, out=half), expected.to(torch.bfloat16))
