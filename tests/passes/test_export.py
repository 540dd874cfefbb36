"""pt2 artifact round trip and the `headpolicy export` command (tiny model, no network)."""

import json

import pytest
import torch

from headpolicy import cli
from headpolicy.errors import ExportError, PolicyMismatchError
from headpolicy.passes import compile_step, export_program
from headpolicy.passes.artifact import export_artifact, load_pt2
from tests.conftest import policy_for, tiny_llama
from tests.passes.conftest import reference_logits

MIXED = [[False, True], [True, False]]


def test_pt2_round_trip_decodes_like_reference(tmp_path, llama):
    policy = policy_for(llama, MIXED, sink=2, window=3)
    path = export_artifact(llama, policy, "pt2", tmp_path / "tiny.pt2")
    programs, manifest = load_pt2(path)
    assert set(programs) == {"prefill", "decode"} and manifest["batch"] == 1
    prefill, decode = programs["prefill"].module(), programs["decode"].module()
    ops = {str(n.target) for n in programs["decode"].graph.nodes if n.op == "call_function"}
    assert "headpolicy.streaming_attention.default" in ops
    ids = torch.randint(3, 97, (1, 14))
    with torch.no_grad():
        out = prefill(ids[:, :5])
        logits, cache = [out[0][0, -1]], list(out[1:])
        for t in range(5, 14):
            out = decode(ids[:, t : t + 1], torch.tensor([[t]]), *cache)
            logits.append(out[0][0, -1])
            cache = list(out[1:])
    ref = reference_logits(llama, policy, ids)[0, 4:]
    torch.testing.assert_close(torch.stack(logits), ref, atol=1e-5, rtol=0)


def test_reexported_program_has_dynamic_lengths(llama):
    step = compile_step(llama, policy_for(llama, MIXED), "prefill")
    ep = export_program(step)
    with torch.no_grad():
        for n in (3, 17):
            assert ep.module()(torch.zeros(1, n, dtype=torch.long))[0].shape[1] == n


def test_policy_for_another_model_is_refused(llama):
    other = tiny_llama(layers=3)
    with pytest.raises(PolicyMismatchError):
        compile_step(llama, policy_for(other, [[True, False]] * 3), "prefill")


def test_model_not_on_sdpa_is_refused(llama):
    llama.set_attn_implementation("eager")
    with pytest.raises(ExportError, match="attn_implementation='sdpa'"):
        compile_step(llama, policy_for(llama, MIXED), "prefill")


def test_cli_export_pt2(tmp_path, monkeypatch, llama, capsys):
    import headpolicy.models

    policy_path = policy_for(llama, MIXED).save(tmp_path / "p.yaml")
    monkeypatch.setattr(headpolicy.models, "load_source", lambda source: (llama, None))
    out = tmp_path / "out.pt2"
    assert cli.main(["export", "tiny", "--policy", str(policy_path), "--format", "pt2", "-o", str(out)]) == 0
    assert out.exists() and capsys.readouterr().out.strip() == str(out)
    _, manifest = load_pt2(out)
    assert json.dumps(manifest) and manifest["passes"]["decode"]["split_attention"] == 2


def test_cli_export_bad_policy_exits_2(tmp_path, capsys):
    code = cli.main(["export", "tiny", "--policy", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "x")])
    assert code == 2 and "PolicyError" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["phi3", "qwen3", "gemma3"])
def test_export_through_the_model_adapter(arch):
    """Fused qkv_proj (Phi-3), q/k norms (Qwen3), a hybrid model's own sliding layer (Gemma 3):
    the exported prefill + decode steps equal the applied model's own split-cache decoding."""
    from headpolicy import SplitKVCache, apply
    from tests.passes.conftest import run_steps
    from tests.test_architectures import mixed_policy, tiny

    model = tiny(arch)
    policy = mixed_policy(model)
    prefill = compile_step(model, policy, "prefill")
    decode = compile_step(model, policy, "decode")
    assert prefill.counts["permute_heads"] >= 1 and prefill.counts["split_attention"] >= 1
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    logits, _ = run_steps(prefill, decode, ids, 6)

    applied = apply(tiny(arch), policy)
    cache = SplitKVCache.for_model(applied)
    with torch.no_grad():
        out = applied(ids[:, :6], cache=cache, use_cache=True)
        want = [out.logits[0, -1]]
        for t in range(6, 20):
            want.append(applied(ids[:, t : t + 1], cache=cache, use_cache=True).logits[0, -1])
    torch.testing.assert_close(torch.stack(logits), torch.stack(want), atol=1e-4, rtol=1e-4)


def test_compensated_policies_are_refused_by_name(tmp_path, monkeypatch, llama, capsys):
    import headpolicy.models
    from headpolicy.errors import UnsupportedPolicyError

    policy = policy_for(llama, MIXED, compensate=True)
    for fmt in ("pt2", "onnx"):
        with pytest.raises(UnsupportedPolicyError, match="2 streaming heads a compensation token"):
            export_artifact(llama, policy, fmt, tmp_path / f"out.{fmt}")
        assert not (tmp_path / f"out.{fmt}").exists()
    monkeypatch.setattr(headpolicy.models, "load_source", lambda source: (llama, None))
    path = policy.save(tmp_path / "p.yaml")
    code = cli.main(["export", "tiny", "--policy", str(path), "--format", "onnx", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "UnsupportedPolicyError" in err and len(err.strip().splitlines()) == 1
