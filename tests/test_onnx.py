"""ONNX export parity on a tiny model: prefill and 3x-window decode vs PyTorch (<= 1e-4)."""

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import headpolicy  # noqa: E402
from headpolicy.errors import ExportError  # noqa: E402
from headpolicy.passes.artifact import compile_steps, export_artifact  # noqa: E402
from headpolicy.policies.schema import HeadSpec  # noqa: E402
from headpolicy.runtime.onnx import CPU, OnnxRunner  # noqa: E402
from tests.conftest import policy_for, tiny_llama  # noqa: E402
from tests.passes.conftest import reference_logits  # noqa: E402

TOL = 1e-4
SINK, WINDOW, PROMPT = 2, 4, 6


def make_model():
    return tiny_llama(layers=3)


def make_policy(model):
    # layer 0 needs a permutation, layer 1 stays on native sdpa, layer 2 has two streaming groups
    policy = policy_for(model, [[False, True], [True, True], [False, False]], sink=SINK, window=WINDOW)
    layers = list(policy.layers)
    layers[2] = (HeadSpec("streaming", sink=1, window=3), layers[2][1])
    return policy.replace(layers=tuple(layers))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_model()
    policy = make_policy(model)
    out = export_artifact(model, policy, "onnx", tmp_path_factory.mktemp("onnx") / "tiny")
    return model, policy, OnnxRunner(out, provider="cpu")


def test_manifest_and_provider(exported):
    _, _, runner = exported
    assert runner.provider == CPU
    parts = [(c["layer"], c["part"]) for c in runner.manifest["cache"]]
    assert parts == [(0, "r"), (0, "s0"), (1, "r"), (2, "s0"), (2, "s1")]


def test_prefill_matches_pytorch(exported):
    model, policy, runner = exported
    ids = torch.randint(3, 97, (1, 11))
    logits, cache = runner.prefill(ids.numpy())
    np.testing.assert_allclose(logits, reference_logits(model, policy, ids)[0, -1].numpy(), atol=TOL, rtol=0)
    steps = compile_steps(model, policy)
    with torch.no_grad():
        expected = steps["prefill"].gm(ids)
    assert len(cache) == len(expected) - 1
    for got, want in zip(cache, expected[1:], strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=TOL, rtol=0)


def test_decode_3x_window_matches_pytorch(exported):
    model, policy, runner = exported
    ids = torch.randint(3, 97, (1, PROMPT))
    n = 3 * WINDOW + 2
    tokens, logits = runner.generate(ids[0].tolist(), n, return_logits=True)

    eager = make_model()
    headpolicy.apply(eager, policy)
    with torch.no_grad():
        out = eager.generate(ids, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert tokens == out.sequences[0, PROMPT:].tolist()
    np.testing.assert_allclose(logits, torch.stack(out.logits)[:, 0].numpy(), atol=TOL, rtol=0)

    full = torch.tensor([ids[0].tolist() + tokens])
    ref = reference_logits(model, policy, full)[0, PROMPT - 1 : -1]
    np.testing.assert_allclose(logits, ref.numpy(), atol=TOL, rtol=0)


def test_streaming_cache_stays_sink_plus_window(exported):
    _, _, runner = exported
    logits, cache = runner.prefill(np.arange(3, 3 + PROMPT)[None])
    for step in range(3 * WINDOW):
        logits, cache = runner.decode(int(np.argmax(logits)), PROMPT + step, cache)
    shapes = {(c["layer"], c["part"]): k.shape for c, k in zip(runner.manifest["cache"], cache[::2], strict=True)}
    assert shapes[(0, "s0")][2] == SINK + WINDOW and shapes[(2, "s0")][2] == 1 + 3
    assert shapes[(0, "r")][2] == PROMPT + 3 * WINDOW


def test_unavailable_provider_is_an_error(exported):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA provider is available here")
    with pytest.raises(ExportError, match="CUDAExecutionProvider is not available"):
        OnnxRunner(exported[2].directory, provider="cuda")


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_quantised_heads_are_refused_by_name(tmp_path, fmt):
    """Exported graphs carry native-precision caches only: a policy with kv_bits 8/4 is refused
    before anything is captured or written (the CLI prints the one line and exits 2)."""
    from headpolicy.errors import QuantizedExportError

    model = make_model()
    policy = make_policy(model)
    layers = [list(row) for row in policy.layers]
    layers[0][1] = dataclasses.replace(layers[0][1], kv_bits=4)
    policy = policy.replace(layers=tuple(tuple(row) for row in layers))
    with pytest.raises(QuantizedExportError, match="1 of 6 KV heads quantised") as err:
        export_artifact(model, policy, fmt, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
