"""The custom ops: schema, fake implementations, dispatch, torch.compile and torch.export."""

import pytest
import torch
from codegen_helpers import TOL, kernel_devices

from headpolicy.codegen import backend, kernels, ops
from headpolicy.codegen.reference import decode_reference, prefill_reference

TABLE = ([True, False, False], [0, 2, 0], [1, 4, 1])


def prefill_inputs(B=2, S=11, D=16, G=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 3 * G, S, D, generator=g)
    k = torch.randn(B, 3, S, D, generator=g)
    v = torch.randn(B, 3, S, D, generator=g)
    return q, k, v, torch.tensor([0, 3])[:B]


def decode_inputs(B=2, D=16, G=2, T=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    q = r(B, 3 * G, 1, D)
    full_rank = torch.arange(T).repeat(B, 1)
    return (
        q, torch.tensor([T - 1, T - 1])[:B], r(B, 1, T, D), r(B, 1, T, D), full_rank,
        [r(B, 2, 5, D)], [r(B, 2, 5, D)], [torch.tensor([[0, 1, T - 2, T - 1, T - 3]] * B)],
        [2], [3], 0.5,
    )  # fmt: skip


def test_schemas():
    assert str(torch.ops.headpolicy.prefill_attention.default._schema) == (
        "headpolicy::prefill_attention(Tensor q, Tensor k, Tensor v, Tensor? pad, bool[] retrieval, "
        "SymInt[] sink, SymInt[] window, float scale) -> Tensor"
    )
    schema = str(torch.ops.headpolicy.decode_attention.default._schema)
    assert schema.startswith("headpolicy::decode_attention(Tensor q, Tensor q_rank, Tensor k_full")
    assert "Tensor[] group_k" in schema and "Tensor[] group_rank" in schema and "sink_k" not in schema


def test_opcheck_reference_backend():
    with backend("reference"):
        q, k, v, pad = prefill_inputs()
        torch.library.opcheck(torch.ops.headpolicy.prefill_attention.default, (q, k, v, pad, *TABLE, 0.3))
        torch.library.opcheck(torch.ops.headpolicy.decode_attention.default, decode_inputs())


def test_auto_backend_runs_the_reference_on_cpu(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the kernels must not run on CPU with backend 'auto'")

    monkeypatch.setattr(kernels, "prefill_triton", boom)
    monkeypatch.setattr(kernels, "decode_triton", boom)
    assert ops.get_backend() == "auto"
    q, k, v, pad = prefill_inputs()
    out = torch.ops.headpolicy.prefill_attention(q, k, v, pad, *TABLE, 0.3)
    torch.testing.assert_close(out, prefill_reference(q, k, v, pad, *TABLE, 0.3))
    args = decode_inputs()
    torch.testing.assert_close(torch.ops.headpolicy.decode_attention(*args), decode_reference(*args))


def test_backend_selection(monkeypatch):
    with pytest.raises(ValueError, match="unknown kernel backend"):
        ops.set_backend("cuda")
    monkeypatch.setenv("HEADPOLICY_KERNEL_BACKEND", "reference")
    assert ops.get_backend() == "reference"
    with backend("triton"):
        assert ops.get_backend() == "triton"
    assert ops.get_backend() == "reference"


def test_torch_compile_fullgraph_calls_the_op():
    q, k, v, pad = prefill_inputs()

    def f(q, k, v, pad):
        return torch.ops.headpolicy.prefill_attention(q, k, v, pad, *TABLE, 0.3) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, pad), f(q, k, v, pad))


def test_torch_export_keeps_the_ops():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v, pad, *dec):
            a = torch.ops.headpolicy.prefill_attention(q, k, v, pad, *TABLE, 0.3)
            b = torch.ops.headpolicy.decode_attention(*dec[:5], [dec[5]], [dec[6]], [dec[7]], [2], [3], 0.5)
            return a, b

    d = decode_inputs()
    flat = (*d[:5], d[5][0], d[6][0], d[7][0])
    args = (*prefill_inputs(), *flat)
    ep = torch.export.export(Attn(), args)
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.headpolicy.prefill_attention.default in targets
    assert torch.ops.headpolicy.decode_attention.default in targets
    for got, want in zip(ep.module()(*args), Attn()(*args), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", kernel_devices())
def test_kernels_accept_strided_views(triton_backend, device):
    """What the runtime hands over: head slices of bigger tensors and a sliced pad vector."""
    q, k, v, pad = (x.to(device) for x in prefill_inputs(S=13))
    big_q = torch.cat([q, q], dim=1)[:, : q.shape[1]]  # non-contiguous view
    pad2 = torch.stack([pad, pad], dim=1)[:, 0]
    out = torch.ops.headpolicy.prefill_attention(big_q, k, v, pad2, *TABLE, 0.3)
    want = prefill_reference(q, k, v, pad, *TABLE, 0.3)
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    # transformers' layout: [B, S, H, D] projections viewed as [B, H, S, D]
    q_t, k_t, v_t = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    out = torch.ops.headpolicy.prefill_attention(q_t, k_t, v_t, pad, *TABLE, 0.3)
    torch.testing.assert_close(out, want, **TOL[torch.float32])


def test_bad_tables_are_clear_errors():
    q, k, v, pad = prefill_inputs()
    with pytest.raises(ValueError, match="one entry per KV head \\(3\\)"):
        torch.ops.headpolicy.prefill_attention(q, k, v, pad, [True, False], [0, 2], [1, 4], 0.3)
    args = list(decode_inputs())
    args[9] = [3, 3]  # group_window: two entries for one group
    with pytest.raises(ValueError, match="one entry per streaming group"):
        torch.ops.headpolicy.decode_attention(*args)
