"""The CPU kernels for quantised parts (codegen/cpu.py): decode against SDPA on the dequantised values,
quantising a token against precision.quantize."""

import logging
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from headpolicy.codegen import cpu, ops
from headpolicy.policies.precision import Quantized, empty_quantized, quantize
from headpolicy.runtime.quant_cache import QuantRetrievalPart, QuantStreamBuffer
from tests.conftest import make_plan


@pytest.fixture
def fresh_libraries(monkeypatch):
    """Each test builds or loads its libraries anew (the loaded ones are per process)."""
    monkeypatch.setattr(cpu, "_libraries", {})


def dense(q, k, v, k_tail, v_tail, scale):
    keys, values = k.dequantize(), v.dequantize()
    if k_tail is not None:
        keys, values = torch.cat([keys, k_tail], 2), torch.cat([values, v_tail], 2)
    return F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=True)


def ring_slots(B, H, D, bits, group, n) -> Quantized:
    """n empty per-token slots [B, H, n, *] (a ring's buffer)."""
    slots = empty_quantized((B, H), D, bits, group, per_channel=False)
    return Quantized(*(t.new_zeros(B, H, n, t.shape[-1]) for t in slots.tensors()), bits, group, False)


def case(B, H, per_kv, N, Nt, D, bits, group, per_channel, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * per_kv, 1, D, generator=g)
    k, v = (torch.randn(B, H, N + Nt, D, generator=g) for _ in range(2))
    k[..., 3] *= 6  # an outlier channel
    if N:
        qk = quantize(k[:, :, :N], bits, group, per_channel=per_channel)
        qv = quantize(v[:, :, :N], bits, group, per_channel=False)
    else:  # a part whose tokens are all still in its full-precision tail
        qk = empty_quantized((B, H), D, bits, group, per_channel=per_channel)
        qv = empty_quantized((B, H), D, bits, group, per_channel=False)
    tail = (k[:, :, N:].contiguous(), v[:, :, N:].contiguous()) if Nt else (None, None)
    return q, qk, qv, *tail


needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on PATH")


@needs_cc
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize(
    "B,H,per_kv,N,Nt,D,group",
    [
        (1, 2, 3, 96, 0, 64, 32),
        (2, 3, 1, 64, 5, 16, 4),
        (2, 1, 2, 0, 7, 32, 8),
        (1, 2, 3, 24, 3, 20, 8),
        (1, 2, 3, 4096, 33, 64, 32),
        (2, 2, 4, 160, 5, 128, 32),  # vector path: more chunks than lanes a token, 4 queries a head
        (1, 1, 3, 64, 0, 64, 64),  # vector path: one channel group a token
    ],
)
def test_kernel_equals_sdpa_on_dequantised_values(fresh_libraries, bits, per_channel, B, H, per_kv, N, Nt, D, group):
    q, k, v, k_tail, v_tail = case(B, H, per_kv, N, Nt, D, bits, group, per_channel)
    out = cpu.decode_quantized(q, k, v, k_tail, v_tail, D**-0.5)
    assert out is not None, "the kernel should build on this machine (a C compiler is a test requirement)"
    torch.testing.assert_close(out, dense(q, k, v, k_tail, v_tail, D**-0.5), rtol=1e-5, atol=2e-5)


@needs_cc
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 target names")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
@pytest.mark.parametrize("bits", [8, 4])
def test_every_vector_width(fresh_libraries, monkeypatch, march, bits):
    """The vector path is sized to the target (4 lanes with SSE2, 8 with AVX2, 16 with AVX-512 on
    this machine's -march=native): built for the older targets it gives the same answers. Per-token
    keys over a count of tokens that is no multiple of the lanes, a tail, and per-channel keys."""
    monkeypatch.setattr(cpu, "FLAGS", tuple(f"-march={march}" if f == "-march=native" else f for f in cpu.FLAGS))
    for per_channel, N in ((False, 77), (True, 96)):
        q, k, v, k_tail, v_tail = case(2, 2, 3, N, 5, 64, bits, 32, per_channel, seed=N)
        out = cpu.decode_quantized(q, k, v, k_tail, v_tail, 0.125)
        assert out is not None
        torch.testing.assert_close(out, dense(q, k, v, k_tail, v_tail, 0.125), rtol=1e-5, atol=2e-5)


@needs_cc
def test_large_logits_stay_finite_and_exact(fresh_libraries):
    """Scores in the hundreds: the softmax subtracts the maximum (and exp of very negative is ~0)."""
    q, k, v, k_tail, v_tail = case(2, 2, 3, 64, 4, 32, 8, 8, True, seed=3)
    out = cpu.decode_quantized(q * 40, k, v, k_tail, v_tail, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, dense(q * 40, k, v, k_tail, v_tail, 1.0), rtol=1e-4, atol=1e-4)


@needs_cc
def test_views_into_preallocated_buffers(fresh_libraries):
    """The cache hands out views of larger buffers (head stride > used tokens): read in place."""
    q, k, v, k_tail, v_tail = case(2, 2, 3, 64, 3, 16, 8, 4, True, seed=1)
    big = torch.zeros(2, 2, 10, 16)
    big[:, :, :3] = k_tail
    big_v = torch.zeros(2, 2, 10, 16)
    big_v[:, :, :3] = v_tail
    view_k, view_v = big[:, :, :3], big_v[:, :, :3]
    assert not view_k.is_contiguous()
    out = cpu.decode_quantized(q, k, v, view_k, view_v, 0.25)
    torch.testing.assert_close(out, dense(q, k, v, k_tail, v_tail, 0.25), rtol=1e-5, atol=2e-5)


@needs_cc
@pytest.mark.parametrize("threads", [1, 2])
def test_split_cache_decode_with_and_without_the_kernel(fresh_libraries, threads):
    """A real quantised retrieval part and a quantised ring after prefill + decode steps: the
    runtime's kernel path equals its dequantise-then-SDPA path (backend 'reference')."""
    from headpolicy.runtime.attention import decode
    from headpolicy.runtime.cache import SplitKVLayer

    plan = make_plan(2, [(1, 2, 5, 8)], 3, retrieval_bits=((1, 8),), kv_group=4, kv_residual=3)
    B, D, T = 2, 16, 40
    g = torch.Generator().manual_seed(5)
    layer = SplitKVLayer(plan)
    k, v = (torch.randn(B, plan.num_kv_heads, T, D, generator=g) for _ in range(2))
    layer.commit(layer.update(k[:, :, :30], v[:, :, :30])[0], None)
    assert isinstance(layer.streams[0], QuantStreamBuffer) and isinstance(layer.qparts[0], QuantRetrievalPart)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in range(30, T):
            step = layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])[0]
            layer.commit(step, None)
            q = torch.randn(B, plan.num_kv_heads * 3, 1, D, generator=g)
            with ops.backend("auto"):
                fast = decode(plan, q, layer, None, None, 0.3)
            with ops.backend("reference"):
                slow = decode(plan, q, layer, None, None, 0.3)
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=2e-5)
        assert cpu._libraries.get((D, 8, 4, 3)) is not None  # the decode kernel ran (the ring's token: (D, 8, 4, 1))
    finally:
        torch.set_num_threads(previous)


@needs_cc
def test_switching_code_generation_off_keeps_prepared_buffers_out_of_c(fresh_libraries, monkeypatch):
    """Buffers are prepared once, but whether C runs is asked at every step: with code generation
    switched off after the buffers were prepared, decode and the ring write stay in PyTorch."""
    from headpolicy.codegen import set_enabled
    from headpolicy.runtime import attention
    from headpolicy.runtime.cache import SplitKVLayer

    plan = make_plan(2, [(1, 2, 5, 8)], 3, retrieval_bits=((1, 8),), kv_group=4, kv_residual=3)
    B, D = 1, 16
    g = torch.Generator().manual_seed(6)
    layer = SplitKVLayer(plan)
    k, v = (torch.randn(B, plan.num_kv_heads, 33, D, generator=g) for _ in range(2))
    layer.commit(layer.update(k[:, :, :32], v[:, :, :32])[0], None)
    q = torch.randn(B, plan.num_kv_heads * 3, 1, D, generator=g)
    expected = attention.decode(plan, q, layer, None, None, 0.3)  # prepares the buffers (C runs)
    assert layer.qparts[0].codes._prepared and layer.streams[0].kv._prepared

    def boom(*args, **kwargs):
        raise AssertionError("a C kernel ran with code generation off")

    monkeypatch.setattr(attention, "decode_prepared", boom)
    monkeypatch.setattr("headpolicy.runtime.quant_cache.put_token", boom)
    set_enabled(False)
    try:
        torch.testing.assert_close(attention.decode(plan, q, layer, None, None, 0.3), expected, rtol=1e-5, atol=2e-5)
        layer.commit(layer.update(k[:, :, 32:], v[:, :, 32:])[0], None)  # the ring's write in PyTorch
        attention.decode(plan, q, layer, None, None, 0.3)
    finally:
        set_enabled(None)


@needs_cc
@pytest.mark.parametrize("bits", [8, 4])
def test_prepared_buffers_read_only_the_slots_in_use(fresh_libraries, bits):
    """The runtime prepares a preallocated buffer once: decode over its first n slots equals
    SDPA over those tokens; growing the buffer prepares it anew (no stale pointer); n that
    splits a per-channel key group, or a query of another shape, is declined."""
    from headpolicy.runtime.quant_cache import QuantTokenBuffer

    B, H, G, D = 2, 2, 3, 64
    g = torch.Generator().manual_seed(bits)
    buf = QuantTokenBuffer(B, H, D, bits, 32, keys_per_channel=True, device="cpu")
    buf.reserve_exactly(128)
    k, v = (torch.randn(B, H, 160, D, generator=g) for _ in range(2))
    buf.append(k[:, :, :64], v[:, :, :64])
    q = torch.randn(B, H * G, 1, D, generator=g)
    tail_k, tail_v = k[:, :, 64:70].contiguous(), v[:, :, 64:70].contiguous()
    prepared = buf.kernel(G)
    assert prepared is not None and prepared.capacity == 128 and buf.kernel(G) is prepared
    out = cpu.decode_prepared(q, prepared, buf.size, tail_k, tail_v, 0.125)
    torch.testing.assert_close(out, dense(q, buf.k, buf.v, tail_k, tail_v, 0.125), rtol=1e-5, atol=2e-5)
    buf.append(k[:, :, 64:160], v[:, :, 64:160])  # past the capacity: reallocated
    assert buf.capacity >= 160 and buf.kernel(G) is not prepared
    out = cpu.decode_prepared(q, buf.kernel(G), buf.size, None, None, 0.125)
    torch.testing.assert_close(out, dense(q, buf.k, buf.v, None, None, 0.125), rtol=1e-5, atol=2e-5)
    assert cpu.decode_prepared(q, buf.kernel(G), 48, None, None, 0.125) is None  # half a key group
    assert cpu.decode_prepared(q[:, :4], buf.kernel(G), 64, None, None, 0.125) is None  # not H x G queries


@needs_cc
@pytest.mark.parametrize("bits", [8, 4])
def test_put_token_into_a_ring_slot_from_strided_rows(fresh_libraries, bits):
    """A ring's new token (a head slice of the step's keys: not contiguous) quantised into slot 3
    of a prepared buffer: bit for bit precision.quantize, every other slot untouched."""
    from headpolicy.runtime.quant_cache import QuantTokenBuffer

    B, H, D = 2, 1, 64
    buf = QuantTokenBuffer(B, H, D, bits, 32, keys_per_channel=False, device="cpu")
    buf.reserve_exactly(6)
    buf.use(6)
    before = [t.clone() for t in (*buf.k.tensors(), *buf.v.tensors())]
    step = torch.randn(B, 3, 1, D) * 5  # all KV heads of a step; the ring holds head 1
    k, v = step[:, 1:2, 0], -step[:, 1:2, 0]
    assert not k.is_contiguous()
    assert cpu.put_token(buf.kernel(), 3, k, v)
    for stored, x in ((buf.k, k), (buf.v, v)):
        want = quantize(x[:, :, None], bits, 32, per_channel=False)
        for t, w in zip(stored.tensors(), want.tensors(), strict=True):
            assert torch.equal(t[:, :, 3], w[:, :, 0])
    after = [t.clone() for t in (*buf.k.tensors(), *buf.v.tensors())]
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a[:, :, :3], b[:, :, :3]) and torch.equal(a[:, :, 4:], b[:, :, 4:])
    assert not cpu.put_token(buf.kernel(), 6, k, v)  # past the capacity


def test_no_compiler_falls_back_with_one_warning(fresh_libraries, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    q, k, v, *_ = case(1, 1, 1, 8, 0, 16, 8, 4, True)
    with caplog.at_level(logging.WARNING, logger="headpolicy.codegen.cpu"):
        assert cpu.decode_quantized(q, k, v, None, None, 0.25) is None
        assert cpu.decode_quantized(q, k, v, None, None, 0.25) is None
    warnings = [r for r in caplog.records if "CPU decode kernel unavailable" in r.getMessage()]
    assert len(warnings) == 1 and "/nonexistent/cc" in warnings[0].getMessage()


def test_failed_build_leaves_nothing_behind(fresh_libraries, monkeypatch, tmp_path, caplog):
    """A compiler that fails: one warning naming it, the PyTorch path, no half-written library."""
    monkeypatch.setenv("HEADPOLICY_KERNEL_CACHE", str(tmp_path))  # empty: other tests' libraries live elsewhere
    monkeypatch.setenv("CC", "false")
    q, k, v, *_ = case(1, 1, 1, 8, 0, 16, 8, 4, True)
    with caplog.at_level(logging.WARNING, logger="headpolicy.codegen.cpu"):
        assert cpu.decode_quantized(q, k, v, None, None, 0.25) is None
    assert any("could not build" in r.getMessage() for r in caplog.records)
    assert not list(tmp_path.iterdir())


def test_declines_what_it_does_not_implement(fresh_libraries, monkeypatch):
    q, k, v, *_ = case(1, 1, 1, 8, 0, 16, 8, 4, True)
    assert cpu.decode_quantized(q.double(), k, v, None, None, 0.25) is None  # float32 only
    assert cpu.decode_quantized(q.expand(1, 1, 2, 16), k, v, None, None, 0.25) is None  # one query per row
    monkeypatch.setenv("HEADPOLICY_DISABLE_CODEGEN", "1")
    assert cpu.decode_quantized(q, k, v, None, None, 0.25) is None


@needs_cc
def test_loading_the_library_keeps_denormals(fresh_libraries):
    """Built without -ffast-math, so loading it does not switch the process to flush-to-zero."""
    q, k, v, *_ = case(1, 1, 1, 8, 0, 16, 8, 4, True)
    assert cpu.decode_quantized(q, k, v, None, None, 0.25) is not None
    assert (torch.tensor([1e-40]) * 1.0).item() != 0.0


@needs_cc
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("D,group", [(64, 32), (16, 4), (20, 8)])
def test_put_token_matches_python_bit_for_bit(fresh_libraries, bits, D, group):
    """Codes, scales and zeros equal precision.quantize's exactly, edge cases included: constant
    groups (scale 0), values past float16's range, ties at half a step, tiny and mixed magnitudes."""
    g = torch.Generator().manual_seed(bits * 100 + D)
    B, H = 3, 2
    x = torch.randn(B, H, D, generator=g) * torch.logspace(-4, 4, D)
    x[0, 0] = 1.5  # a constant token: span 0
    x[0, 1, : D // 2] = 7e4  # clamped to float16's maximum
    x[1, 0] = torch.arange(D) * 0.5 - 3  # ties between codes
    x[1, 1] = torch.randn(D, generator=g) * 1e-6
    want = quantize(x[:, :, None], bits, group, per_channel=False)
    keys, values = (ring_slots(B, H, D, bits, group, 5) for _ in range(2))
    assert cpu.put_token(cpu.prepare(keys, values, 1), 3, x, -x)  # slot 3 of 5
    for stored, expected in ((keys, want), (values, quantize(-x[:, :, None], bits, group, per_channel=False))):
        for got, w in zip(stored.tensors(), expected.tensors(), strict=True):
            assert torch.equal(got[:, :, 3], w[:, :, 0])
            assert not got[:, :, [0, 1, 2, 4]].any()  # the other slots untouched


@needs_cc
def test_put_token_nan_as_python(fresh_libraries):
    """A NaN channel: torch's min/max carry it, so the group's scale and zero are NaN and its
    codes 0; the other groups are untouched by it. The same bits here."""
    x = torch.randn(2, 1, 16)
    x[0, 0, 5] = float("nan")
    want = quantize(x[:, :, None], 8, 4, per_channel=False)
    keys, values = (ring_slots(2, 1, 16, 8, 4, 1) for _ in range(2))
    assert cpu.put_token(cpu.prepare(keys, values, 1), 0, x, x)
    for got, expected in zip(keys.tensors(), want.tensors(), strict=True):
        bits = (lambda t: t.view(torch.int16)) if got.dtype == torch.float16 else (lambda t: t)
        assert torch.equal(bits(got), bits(expected))
    assert keys.scale[0, 0, 0, 1].isnan() and not keys.scale[1].isnan().any()


def test_decode_declines_mismatched_parts(fresh_libraries):
    """Shapes the C code would misread are handed back to PyTorch, not read."""
    q, k, v, k_tail, v_tail = case(1, 2, 3, 32, 4, 16, 8, 4, True)
    _, _, v4, _, _ = case(1, 2, 3, 32, 4, 16, 4, 4, True)
    assert cpu.decode_quantized(q, k, v4, k_tail, v_tail, 0.25) is None  # bits differ
    short = Quantized(v.codes[:, :, :16], v.scale[:, :, :16], v.zero[:, :, :16], 8, 4, False)
    assert cpu.decode_quantized(q, k, short, k_tail, v_tail, 0.25) is None  # fewer value tokens
    wide = torch.zeros(1, 2, 4, 32)[..., :16]
    wide.copy_(v_tail)
    assert cpu.decode_quantized(q, k, v, k_tail, wide, 0.25) is None  # tails laid out apart


@needs_cc
def test_put_token_declines_what_it_does_not_implement(fresh_libraries):
    """Per-channel keys (a retrieval part: written a group at a time, never a token), another
    shape, a slot past the capacity, another dtype: nothing written."""
    x = torch.randn(1, 1, 16)
    keys, values = quantize(torch.randn(1, 1, 4, 16), 8, 4, per_channel=True), ring_slots(1, 1, 16, 8, 4, 4)
    assert not cpu.put_token(cpu.prepare(keys, values, 1), 0, x, x)
    ring = cpu.prepare(ring_slots(1, 1, 16, 8, 4, 4), values, 1)
    assert not cpu.put_token(ring, 0, x.expand(1, 2, 16), x.expand(1, 2, 16))
    assert not cpu.put_token(ring, 4, x, x)
    assert not cpu.put_token(ring, 0, x.double(), x.double())
    assert cpu.put_token(ring, 3, x, x)


def _layer_pair(plan, B, D, T0, g):
    """Two SplitKVLayers of `plan` holding the same first T0 tokens, and the tokens to come."""
    from headpolicy.runtime.cache import SplitKVLayer

    k, v = (torch.randn(B, plan.num_kv_heads, T0 + 80, D, generator=g) for _ in range(2))
    layers = [SplitKVLayer(plan), SplitKVLayer(plan)]
    for layer in layers:
        layer.commit(layer.update(k[:, :, :T0], v[:, :, :T0])[0], None)
    return layers, k, v


def _steps_agree(plan, fast_layer, slow_layer, k, v, steps, g):
    """Token t of k, v for each t in `steps` into both layers, each step attended through the
    registered attention function: backend "auto" (C where it applies) on fast_layer, "reference"
    (per-part PyTorch) on slow_layer; their outputs agree."""
    from tests.conftest import attend

    B, _, _, D = k.shape
    for t in steps:
        q = torch.randn(B, plan.num_kv_heads * plan.group_size, 1, D, generator=g)
        outs = []
        for layer, backend in ((fast_layer, "auto"), (slow_layer, "reference")):
            step = layer.update(k[:, :, t : t + 1], v[:, :, t : t + 1])[0]
            with ops.backend(backend):
                outs.append(attend(plan, q, step, step, None, 0.3))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=2e-5)


@needs_cc
@pytest.mark.parametrize("threads", [1, 2])
def test_fully_quantised_layer_decodes_in_one_call_per_bit_width(fresh_libraries, monkeypatch, threads):
    """A layer whose every head is quantised (int8 and int4 retrieval groups, int4 and int8 rings
    of different windows) decodes through CStep: the same outputs as the per-part PyTorch path
    (backend 'reference') step after step, the same codes in every buffer, one C call per bit
    width and step, and a rebuild when a buffer is reallocated (no reserve here: they grow)."""
    from headpolicy.runtime import attention

    plan = make_plan(2, [(1, 2, 5, 4), (2, 1, 7, 8)], 3, retrieval_bits=((1, 8), (1, 4)), kv_group=4, kv_residual=3)
    assert plan.fully_quantized
    B, D, T0 = 2, 16, 240  # the codes' first block holds 256 tokens: the steps outgrow it
    g = torch.Generator().manual_seed(8)
    (fast_layer, slow_layer), k, v = _layer_pair(plan, B, D, T0, g)
    builds, calls = [], []
    build, step_call = attention.CStep.build, cpu.LayerStep.__call__
    monkeypatch.setattr(attention.CStep, "build", lambda *a: builds.append(1) or build(*a))
    monkeypatch.setattr(cpu.LayerStep, "__call__", lambda *a: calls.append(1) or step_call(*a))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _steps_agree(plan, fast_layer, slow_layer, k, v, range(T0, T0 + 80), g)
    finally:
        torch.set_num_threads(previous)
    assert len(calls) == 2 * 80  # int8 and int4: two calls a step
    assert 1 < len(builds) < 80  # built once, rebuilt when a growing buffer moved, not every step
    for fast, slow in zip((*fast_layer.qparts, *(s.kv for s in fast_layer.streams)),
                          (*slow_layer.qparts, *(s.kv for s in slow_layer.streams)), strict=True):  # fmt: skip
        for a, b in zip(fast.allocated, slow.allocated, strict=True):
            assert torch.equal(a, b)
    for fast, slow in zip(fast_layer.streams, slow_layer.streams, strict=True):
        assert torch.equal(fast.rank, slow.rank)


@needs_cc
def test_c_step_declines_layers_with_native_heads_and_padded_steps(fresh_libraries, monkeypatch):
    """CStep runs only where every head is quantised and no row is padded; elsewhere the per-part path."""
    from headpolicy.runtime import attention
    from tests.conftest import attend

    monkeypatch.setattr(attention, "_decode_in_c", lambda *a: (_ for _ in ()).throw(AssertionError("C step ran")))
    g = torch.Generator().manual_seed(9)
    mixed = make_plan(2, [(1, 2, 5, 4)], 3, retrieval_bits=((1, 8),), kv_group=4, kv_residual=3)
    assert not mixed.fully_quantized
    (layer, _), k, v = _layer_pair(mixed, 1, 16, 9, g)
    step = layer.update(k[:, :, 9:10], v[:, :, 9:10])[0]
    attend(mixed, torch.randn(1, 9, 1, 16, generator=g), step, step, None, 0.3)
    full = make_plan(1, [(1, 2, 5, 4)], 3, retrieval_bits=((1, 8),), kv_group=4, kv_residual=3)
    assert full.fully_quantized
    (layer, _), k, v = _layer_pair(full, 2, 16, 9, g)
    step = layer.update(k[:, :, 9:10], v[:, :, 9:10])[0]
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :2] = False  # row 1 left-padded
    attend(full, torch.randn(2, 6, 1, 16, generator=g), step, step, mask, 0.3)


@needs_cc
def test_layer_step_refuses_slots_outside_its_buffers(fresh_libraries):
    """LayerStep.set checks what the C code will index with: a slot in a per-channel part, or past capacity."""
    k = empty_quantized((1, 1), 16, 8, 4, per_channel=False, device="cpu")
    ring = cpu.prepare(_blank_like(k, 8), _blank_like(k, 8), 3)
    step = cpu.LayerStep.build([cpu.StepPart(ring, 0)], 1, 1, 3)
    step.set(0, 8, 7)
    for n, slot in ((9, 0), (8, 8), (-1, 0)):
        with pytest.raises(ValueError, match="out of its buffers"):
            step.set(0, n, slot)
    kc = empty_quantized((1, 1), 16, 8, 4, per_channel=True, device="cpu")
    coded = cpu.prepare(_blank_like(kc, 8), _blank_like(k, 8), 3)  # a retrieval part: keys per channel
    step = cpu.LayerStep.build([cpu.StepPart(coded, 0)], 1, 1, 3)
    step.set(0, 4)
    for n, slot in ((3, -1), (4, 0)):  # not whole key groups; a slot where keys are per channel
        with pytest.raises(ValueError, match="out of its buffers"):
            step.set(0, n, slot)


def _blank_like(like: Quantized, tokens: int) -> Quantized:
    from headpolicy.runtime.quant_cache import _blank

    return _blank(like, tokens)


@needs_cc
def test_a_declined_c_step_falls_back_once_per_allocation(fresh_libraries, monkeypatch):
    """Where LayerStep declines the buffers, each step takes the per-part path (the ring's token
    written in PyTorch or by put_token), with the same outputs, and the decline is remembered
    rather than asked again every step."""

    plan = make_plan(1, [(1, 2, 5, 4)], 3, retrieval_bits=((1, 8),), kv_group=4, kv_residual=3)
    g = torch.Generator().manual_seed(10)
    (fast_layer, slow_layer), k, v = _layer_pair(plan, 1, 16, 20, g)
    builds = []
    monkeypatch.setattr(cpu.LayerStep, "build", classmethod(lambda cls, *a: builds.append(1)))
    _steps_agree(plan, fast_layer, slow_layer, k, v, range(20, 30), g)
    assert fast_layer.kernel_step.calls is None and len(builds) == 1
