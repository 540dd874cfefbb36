"""Slow: SmolLM2-135M exported to ONNX answers a passkey prompt exactly like PyTorch with the policy."""

import pytest
import torch

pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.slow

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(key: str, repeats: int = 12) -> str:
    return (
        "There is a pass key hidden in this text. Remember it. "
        + FILLER * (repeats // 2)
        + f"The pass key is {key}. Remember it. {key} is the pass key. "
        + FILLER * (repeats - repeats // 2)
        + "What is the pass key? The pass key is"
    )


def hand_policy(model, sink=16, window=256):
    """KV head 0 of every layer keeps the full cache; the rest stream (no profiling needed).

    Window 256 covers the key but not the whole ~336-token prompt: streaming heads have
    already evicted tokens (the ring wrapped during prefill) when the answer is produced.
    (With window 64 this hand policy loses the key, in PyTorch and ONNX alike.)
    """
    from headpolicy import HeadPolicy, describe_model

    info = describe_model(model)
    table = [[h == 0 for h in range(info.num_kv_heads)] for _ in range(info.num_layers)]
    return HeadPolicy.from_kinds(info, table, sink=sink, window=window)


def test_smollm2_onnx_answers_passkey_like_pytorch(tmp_path):
    import headpolicy
    from headpolicy.passes.artifact import export_artifact
    from headpolicy.runtime.onnx import OnnxRunner

    model, tok = headpolicy.load_model("smollm2-135m")
    policy = hand_policy(model)
    runner = OnnxRunner(export_artifact(model, policy, "onnx", tmp_path / "smollm2"))
    ids = tok(passkey_prompt("71432"), return_tensors="pt").input_ids
    assert ids.shape[1] > policy.sink + policy.window  # streaming heads really drop tokens
    onnx_tokens = runner.generate(ids[0].tolist(), 8)

    headpolicy.apply(model, policy)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    torch_tokens = out[0, ids.shape[1] :].tolist()
    print(f"[{runner.provider}] onnx: {tok.decode(onnx_tokens)!r} torch: {tok.decode(torch_tokens)!r}")
    assert onnx_tokens == torch_tokens
    assert "71432" in tok.decode(onnx_tokens)
