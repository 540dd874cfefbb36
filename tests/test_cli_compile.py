"""`headpolicy compile` / `headpolicy eval` on a tiny random checkpoint written to a temp dir."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from headpolicy import HeadPolicy
from headpolicy.cli import main
from headpolicy.profiler.compile import CompileSettings
from tests.conftest import tiny_llama

VOCAB = 259  # 3 specials + one token per byte


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {c: 3 + i for i, c in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab=VOCAB, layers=2).save_pretrained(path)
    _byte_tokenizer().save_pretrained(path)
    return path


FAST = ["--lengths", "600", "--depths", "0.5", "--kinds", "passkey,multikey", "--text-length", "700",
        "--text-from", "300", "--sink", "4", "--window", "8", "--windows", "8,32", "--quiet"]  # fmt: skip


def test_compile_writes_a_valid_policy(checkpoint, tmp_path, capsys):
    out = tmp_path / "p.yaml"
    report = tmp_path / "compile.json"
    args = ["-o", str(out), "--budget", "0.5", "--seed", "3", "--json", str(report), "--time-budget", "600", *FAST]
    rc = main(["compile", str(checkpoint), *args])
    assert rc == 0
    assert json.loads(report.read_text())["results"]["retrieval_heads"] == 2
    policy = HeadPolicy.load(out)
    assert policy.num_retrieval == 2 and policy.num_heads == 4
    assert (policy.sink, policy.window) == (4, 8)
    r = policy.results
    assert r["retrieval_heads"] == 2 and 0 < r["kv_fraction"] < 1
    assert set(r["calibration"]["loss"]) >= {"ppl_ratio", "ans_drop", "ans_kept"} and "loss" in r["heldout"]
    assert policy.provenance.seed == 3 and policy.provenance.settings["budget"] == 0.5
    assert all(h.score is not None for row in policy.layers for h in row)
    text = capsys.readouterr().out
    assert "retrieval heads" in text and "2/4" in text


def test_compile_target_drop_then_eval(checkpoint, tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["compile", str(checkpoint), "-o", str(out), "--target-drop", "50", "--max-kv-budget", "1", *FAST]) == 0
    policy = HeadPolicy.load(out)
    search = policy.results["search"]
    grid = CompileSettings().kv_grid
    assert search and search[0]["kv_budget"] == grid[(len(grid) - 1) // 2]  # the middle budget first
    assert any(step["ok"] for step in search) and "heldout" in policy.results
    js = tmp_path / "eval.json"
    rc = main(["eval", str(checkpoint), "--policy", str(out), "--lengths", "600", "--depths", "0.5", "--seeds", "1",
               "--kinds", "passkey,word", "--text-lengths", "1200", "--baselines", "streaming,random", "-o", str(js),
               "--quiet"])  # fmt: skip
    assert rc == 0
    data = json.loads(js.read_text())
    assert set(data["configs"]) == {"full", "policy", "streaming", "random"}
    full = data["configs"]["full"]["by_length"]["600"]
    assert full["kv_fraction"] == 1.0 and full["kv_bytes"] > 0
    assert full["paired"] == {"items": 2, "lost": 0, "gained": 0, "diff_points": 0.0, "ci95_points": [0.0, 0.0]}
    assert data["configs"]["full"]["ppl_ratio"] == {"1200": 1.0} and data["configs"]["policy"]["ppl_ratio"]["1200"] > 0
    assert "lost" in capsys.readouterr().out


@pytest.mark.parametrize(("budget", "warned"), [("0", True), ("0.1", True), ("0.5", False)])
def test_a_policy_without_retrieval_heads_is_warned_about(checkpoint, tmp_path, capsys, budget, warned):
    """--budget 0 (or one that rounds to no head of 4) writes the all-streaming baseline: say so."""
    out = tmp_path / "p.yaml"
    assert main(["compile", str(checkpoint), "-o", str(out), "--budget", budget, "--no-heldout", *FAST]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if line.startswith("headpolicy compile: warning:")]
    assert HeadPolicy.load(out).num_retrieval == (0 if warned else 2)
    if warned:
        assert len(warning) == 1 and f"--budget {budget} keeps none" in warning[0]
        assert "sink 4 + window 8" in warning[0]
    else:
        assert warning == []


def test_eval_of_a_policy_for_other_weights_needs_the_flag(checkpoint, tmp_path, capsys):
    from tests.conftest import policy_for

    foreign = tmp_path / "foreign.yaml"
    policy_for(tiny_llama(vocab=VOCAB, layers=2, seed=9), [[True, False], [False, True]]).save(foreign)
    args = ["eval", str(checkpoint), "--policy", str(foreign), "--lengths", "600", "--depths", "0.5",
            "--kinds", "passkey", "--seeds", "1", "--text-lengths", "1200", "-o", str(tmp_path / "e.json"),
            "--quiet"]  # fmt: skip
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("headpolicy eval: PolicyMismatchError") and "--no-fingerprint-check" in last
    assert main([*args, "--no-fingerprint-check"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["configs"]["policy"]


def test_eval_takes_the_full_run_from_an_earlier_result_only_where_it_stands_for_this_one(checkpoint, tmp_path,
                                                                                           capsys):  # fmt: skip
    """--full-from: the full model's answers and perplexity come from an earlier eval of the same
    weights, settings and items (the result says so); any difference is a named one-line error."""
    from tests.conftest import policy_for

    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    model = tiny_llama(vocab=VOCAB, layers=2)
    policy_for(model, [[True, False], [False, True]]).save(first)
    policy_for(model, [[False, False], [True, True]]).save(second)
    base = ["eval", str(checkpoint), "--lengths", "600", "--depths", "0.5", "--kinds", "passkey", "--seeds", "2",
            "--text-lengths", "1200", "--quiet"]  # fmt: skip
    ran, reused = tmp_path / "ran.json", tmp_path / "reused.json"
    assert main([*base, "--policy", str(first), "-o", str(ran)]) == 0
    assert main([*base, "--policy", str(second), "-o", str(tmp_path / "b_ran.json")]) == 0
    assert main([*base, "--policy", str(second), "--full-from", str(ran), "-o", str(reused)]) == 0
    a, b = json.loads((tmp_path / "b_ran.json").read_text()), json.loads(reused.read_text())
    assert b["configs"]["full"]["reused"] and "reused" not in a["configs"]["full"]
    for name in ("full", "policy"):  # the same table as running the full model again
        for key in ("by_length", "ppl_ratio", "cells", "text_nll"):
            assert a["configs"][name][key] == b["configs"][name][key], (name, key)
    assert b["model"]["fingerprint"] == a["model"]["fingerprint"]
    capsys.readouterr()

    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    other_weights = tmp_path / "other.json"
    other_weights.write_text(json.dumps({**a, "model": {**a["model"], "fingerprint": "0" * 16}}))
    cases = [
        (["--seeds", "1"], ran, "made with seeds=2, this run has 1"),
        (["--seed", "5"], ran, "made with seed=1, this run has 5"),
        ([], bad_json, "cannot read an eval result"),
        ([], tmp_path / "missing.json", "cannot read an eval result"),
        ([], other_weights, "from other weights"),
    ]
    for extra, source, message in cases:
        args = [*base, *extra, "--policy", str(second), "--full-from", str(source), "-o", str(tmp_path / "x.json")]
        assert main(args) == 2, extra
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("headpolicy eval: ResultsMismatchError") and message in last, last
    assert not (tmp_path / "x.json").exists()


def test_bad_model_path_fails_cleanly(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    rc = main(["compile", str(tmp_path / "no-such-model"), "-o", str(out), "--budget", "0.5", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert len(err.splitlines()) == 1 and err.startswith("headpolicy compile: ModelSourceError")


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--budget", "1.5"], "budget must be"),
        (["--budget", "0.25", "--min-per-layer", "2"], "cannot give each"),
        (["--kv-budget", "0.3", "--kv-residual", "-1"], "--kv-residual"),
        (["--kv-budget", "0.3", "--kv-group", "0"], "--kv-group"),
    ],
)
def test_impossible_budget_fails_cleanly(checkpoint, tmp_path, capsys, extra, match):
    out = tmp_path / "p.yaml"
    rc = main(["compile", str(checkpoint), "-o", str(out), *extra, "--no-heldout", *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    last = err.splitlines()[-1]  # earlier lines are transformers' loading bars
    assert last.startswith("headpolicy compile: BudgetError") and match in last


def test_compile_quantisation_settings_reach_the_policy_and_its_byte_count(checkpoint, tmp_path):
    """--kv-group / --kv-residual: the policy carries them, and the budget holds as allocated
    (a smaller residual leaves its bytes to the knapsack)."""
    kv = {}
    for residual in (0, 32):
        out = tmp_path / f"r{residual}.yaml"
        args = ["-o", str(out), "--kv-budget", "0.3", "--precision", "auto", "--kv-group", "16", "--kv-residual",
                str(residual), "--repair-seconds", "0", "--no-heldout", *FAST]  # fmt: skip
        assert main(["compile", str(checkpoint), *args]) == 0
        policy = HeadPolicy.load(out)
        assert (policy.kv_group, policy.kv_residual) == (16, residual)
        assert policy.provenance.settings["kv_residual"] == residual
        assert policy.results["kv_fraction_chosen_heads"] <= 0.3 + 1e-9
        kv[residual] = policy.kv_bytes(600)
    assert kv[0] != kv[32]


def test_compile_chooses_only_full_attention_layers_of_a_hybrid_model(tmp_path):
    """Gemma 3 style: the middle layer slides on its own; the budget counts the other layers' heads."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
        layer_types=["full_attention", "sliding_attention", "full_attention"], max_position_embeddings=2048,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    ckpt = tmp_path / "tiny-gemma3"
    Gemma3ForCausalLM(cfg).save_pretrained(ckpt)
    _byte_tokenizer().save_pretrained(ckpt)
    out = tmp_path / "p.yaml"
    assert main(["compile", str(ckpt), "-o", str(out), "--budget", "0.5", "--method", "attention_mass", *FAST]) == 0
    policy = HeadPolicy.load(out)
    assert policy.model.native_windows == (None, 6, None)
    assert policy.num_retrieval == 2  # half of the 4 heads in the 2 full-attention layers
    assert [(h.kind, h.sink, h.window) for h in policy.layers[1]] == [("streaming", 0, 6)] * 2


@pytest.mark.parametrize("method", ["hybrid", "ensemble"])
def test_compile_with_a_combined_method_reports_member_agreement(checkpoint, tmp_path, capsys, method):
    import numpy as np

    from headpolicy.profiler.scorers import get_scorer

    out, raw = tmp_path / "p.yaml", tmp_path / "scores.json"
    args = ["-o", str(out), "--budget", "0.5", "--method", method, "--scores-json", str(raw), "--no-heldout", *FAST]
    assert main(["compile", str(checkpoint), *args]) == 0
    policy = HeadPolicy.load(out)
    assert policy.provenance.method == method and policy.num_retrieval == 2
    scores = json.loads(raw.read_text())
    assert set(scores) == {*get_scorer(method).members, method}
    combined = np.asarray(scores[method])
    assert np.allclose([h.score for row in policy.layers for h in row], combined.reshape(-1), atol=1e-5)
    assert "scorer agreement" in capsys.readouterr().out


def test_the_warning_names_per_head_windows():
    """A --kv-budget policy with no retrieval head keeps a window per head: the warning says which
    range, not the defaults' single window."""
    from headpolicy.cli.compile import all_streaming_warning
    from headpolicy.models import describe_model

    info = describe_model(tiny_llama())
    rules = [[(4, 8 * 2**h) for h in range(info.num_kv_heads)] for _ in range(info.num_layers)]
    warning = all_streaming_warning(HeadPolicy.from_rules(info, rules), None)
    assert "the KV budget left room for none" in warning
    assert f"sink 4 + its own window (8-{8 * 2 ** (info.num_kv_heads - 1)})" in warning
