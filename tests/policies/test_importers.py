"""Importing DuoAttention, Retrieval Head and RazorAttention patterns (small hand-written files)."""

import hashlib
import json

import numpy as np
import pytest

from headpolicy import BudgetError, HeadPolicy, ModelInfo, PolicyError
from headpolicy.policies.importers import (
    ImportFormatError,
    check_options,
    format_names,
    import_policy,
    policy_from_source,
    read_source,
)
from headpolicy.policies.schema import MAX_TOKENS

# 3 layers x 2 KV heads, 3 query heads per KV head
INFO = ModelInfo("tiny", "LlamaForCausalLM", 3, 6, 2, 16, "sha256:0123")

DUO_GATES = [[0.9, 0.1], [0.2, 0.6], [0.05, 0.45]]


def write_duo(tmp_path, gates=DUO_GATES, config=None):
    tsv = tmp_path / "full_attention_heads.tsv"
    tsv.write_text("".join("\t".join(str(g) for g in row) + "\n" for row in gates))
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return tsv


def sha(path):
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def table(policy):
    return policy.retrieval_table()


# ---- DuoAttention ---------------------------------------------------------------------------
def test_duo_attention_threshold_scores_window_and_provenance(tmp_path):
    tsv = write_duo(tmp_path, config={"sink_size": 16, "recent_size": 32, "lr": 0.02})
    p = import_policy("duo-attention", tsv, INFO)
    assert table(p) == [[True, False], [False, True], [False, False]]  # default threshold 0.5
    assert (p.sink, p.window) == (16, 32)
    assert [[h.score for h in row] for row in p.layers] == DUO_GATES
    s = p.provenance.settings
    assert p.provenance.method == "import:duo-attention" and s["source_format"] == "duo-attention"
    assert s["source_files"] == [
        {"name": "full_attention_heads.tsv", "sha256": sha(tsv)},
        {"name": "config.json", "sha256": sha(tmp_path / "config.json")},
    ]
    assert s["selection"] == {"threshold": 0.5}
    assert HeadPolicy.from_yaml(p.to_yaml()) == p  # provenance is plain data: round-trips


def test_duo_attention_budget_threshold_folder_and_overrides(tmp_path):
    write_duo(tmp_path, config={"sink_size": 16, "recent_size": 32})
    # budget 0.5 of 6 heads -> the 3 best gates: 0.9, 0.6, 0.45
    p = import_policy("duo", tmp_path, INFO, budget=0.5, window=64)
    assert table(p) == [[True, False], [False, True], [False, True]]
    assert (p.sink, p.window) == (16, 64)
    assert p.provenance.settings["selection"] == {"budget": 0.5}
    p = import_policy("duo", tmp_path, INFO, threshold=0.15)
    assert table(p) == [[True, False], [True, True], [False, True]]
    assert import_policy("duo", tmp_path, INFO, budget=0.0).num_retrieval == 0


def test_duo_attention_clips_gates_like_duo_attention(tmp_path):
    # np.savetxt's format, gates outside [0, 1] (DuoAttention clips them when it loads them)
    tsv = write_duo(tmp_path, gates=[["1.300000000000000044e+00", "-2e-01"], [0.2, 0.6], [0.05, 0.45]])
    p = import_policy("duo-attention", tsv, INFO)
    assert [h.score for h in p.layers[0]] == [1.0, 0.0]
    assert "clipped" in p.provenance.settings["reduction"]


def test_duo_attention_without_config_uses_defaults(tmp_path):
    p = import_policy("duo-attention", write_duo(tmp_path), INFO)
    assert (p.sink, p.window) == (64, 256)
    assert len(p.provenance.settings["source_files"]) == 1


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0.9\t0.1\n0.2\n0.05\t0.45\n", r"line 2: expected 2 tab-separated gate values .* got 1"),
        ("0.9\t0.1\n0.2\t0.6\n0.05\tabc\n", r"line 3, column 2: expected a number, got 'abc'"),
        ("0.9\t0.1\n0.2\tnan\n0.05\t0.4\n", r"line 2, column 2: expected a finite number"),
        ("0.9\t0.1\n0.2\t0.6\n", r"expected 3 lines \(one per layer of tiny\), got 2"),
        ("0.9 0.1\n0.2 0.6\n0.1 0.1\n", r"line 1, column 1: expected a number, got '0.9 0.1' \(.*separated by tabs"),
    ],
)
def test_duo_attention_malformed_tsv(tmp_path, text, match):
    tsv = tmp_path / "full_attention_heads.tsv"
    tsv.write_text(text)
    with pytest.raises(ImportFormatError, match=match):
        import_policy("duo-attention", tsv, INFO)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ('{"sink_size": 16}', r"config.json: missing key 'recent_size'"),
        ('{"sink_size": 16, "recent_size": 0}', r"key 'recent_size': expected an integer from 1 to MAX_TOKENS"),
        ('{"sink_size": 1e29, "recent_size": 8}', r"key 'sink_size': expected an integer from 0 to MAX_TOKENS"),
        ('{"sink_size": 16, "recent_size": 100000000000000000000000000000}', r"key 'recent_size': .*MAX_TOKENS"),
        ('{"sink_size": 2147483648, "recent_size": 8}', r"key 'sink_size': expected an integer from 0 to .*2147483647"),
        ('{"sink_size": "16", "recent_size": 8}', r"key 'sink_size'"),
        ("[1, 2]", r"config.json: expected a JSON object"),
        ('{"sink_size": 16,\n "recent_size": }', r"config.json: not valid JSON \(line 2"),
    ],
)
def test_duo_attention_malformed_config(tmp_path, config, match):
    tsv = write_duo(tmp_path)
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ImportFormatError, match=match):
        import_policy("duo-attention", tsv, INFO)


# ---- Retrieval Head ---------------------------------------------------------------------------
def retrieval_head_scores():
    """Per-trial scores of every query head; KV head h owns query heads 3h .. 3h+2."""
    data = {f"{layer}-{head}": [0.0, 0.0] for layer in range(3) for head in range(6)}
    # layer 0, KV head 0: query head 1 has one lucky trial (mean 0.5), query head 2 is steady (mean 0.6)
    data["0-1"] = [0.9, 0.1]
    data["0-2"] = [0.6, 0.6]
    # layer 1, KV head 1 (query heads 3..5)
    data["1-4"] = [0.3, 0.1, 0.2]
    # layer 2, KV head 1: a pre-averaged single number is accepted
    data["2-5"] = 0.05
    return data


def test_retrieval_head_reduces_mean_over_trials_then_max_over_group(tmp_path):
    src = tmp_path / "retrieval_heads.json"
    src.write_text(json.dumps(retrieval_head_scores()))
    p = import_policy("retrieval-head", src, INFO)
    scores = [[h.score for h in row] for row in p.layers]
    np.testing.assert_allclose(scores, [[0.6, 0.0], [0.0, 0.2], [0.0, 0.05]])
    assert table(p) == [[True, False], [False, True], [False, False]]  # default threshold 0.1
    s = p.provenance.settings
    assert s["source_files"] == [{"name": "retrieval_heads.json", "sha256": sha(src)}]
    assert "max over the query heads" in s["reduction"] and "mean over trials" in s["reduction"]
    top = import_policy("retrieval_head", src, INFO, budget=0.5)
    assert table(top) == [[True, False], [False, True], [False, True]]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update({"x-1": [0.1]}), r"key 'x-1': expected a non-negative integer"),
        (lambda d: d.update({"0_1": [0.1]}), r"key '0_1': expected 'layer-head'"),
        (lambda d: d.update({"0-6": [0.1]}), r"key '0-6': out of range for tiny \(3 layers x 6 query heads\)"),
        (lambda d: d.update({"3-0": [0.1]}), r"key '3-0': out of range"),
        (lambda d: d.update({"1-1": []}), r"key '1-1': expected a non-empty list"),
        (lambda d: d.update({"1-1": [0.1, "a"]}), r"key '1-1'\[1\]: expected a finite number"),
        (lambda d: d.update({"1-1": [10**400]}), r"key '1-1'\[0\]: expected a finite number"),  # float() overflows
        (lambda d: d.update({"\u00b2-1": [0.1]}), r"key '\u00b2-1': expected a non-negative integer"),  # '²'.isdigit()
        (lambda d: d.update({"1" * 5000 + "-1": [0.1]}), r"expected a non-negative integer"),
        (lambda d: d.pop("2-3"), r"missing key '2-3' \(1 of 18 query heads have no scores\)"),
    ],
)
def test_retrieval_head_malformed(tmp_path, edit, match):
    data = retrieval_head_scores()
    edit(data)
    src = tmp_path / "r.json"
    src.write_text(json.dumps(data))
    with pytest.raises(ImportFormatError, match=match):
        import_policy("retrieval-head", src, INFO)


@pytest.mark.parametrize(
    ("text", "match"),
    [("[" * 100_000 + "]" * 100_000, r"JSON nested too deeply"), ('{"0": [' + "1" * 5000 + "]}", r"not valid JSON")],
)
def test_json_python_cannot_build_is_a_format_error(tmp_path, text, match):
    src = tmp_path / "r.json"
    src.write_text(text)
    with pytest.raises(ImportFormatError, match=match):
        import_policy("razor-attention", src, INFO)


def test_retrieval_head_invalid_json_names_the_line(tmp_path):
    src = tmp_path / "r.json"
    src.write_text('{"0-0": [0.1],\n"0-1": [0.2,]\n}')
    with pytest.raises(ImportFormatError, match=r"r.json: not valid JSON \(line 2"):
        import_policy("retrieval-head", src, INFO)


# ---- RazorAttention -----------------------------------------------------------------------------
def test_razor_attention_lists_heads(tmp_path):
    src = tmp_path / "razor.json"
    src.write_text(json.dumps({"0": [1], "2": [0, 1], "1": []}))
    p = import_policy("razor-attention", src, INFO, sink=4, window=128)
    assert table(p) == [[False, True], [False, False], [True, True]]
    assert all(h.score is None for row in p.layers for h in row)
    assert (p.sink, p.window) == (4, 128)
    assert p.provenance.settings["selection"] == {"listed": True}
    with pytest.raises(BudgetError, match="carry no scores"):
        import_policy("razor", src, INFO, budget=0.5)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"0": [2]}, r"key '0'\[0\]: expected a KV head id in \[0, 2\), got 2"),
        ({"0": [True]}, r"key '0'\[0\]: expected a KV head id"),
        ({"5": [0]}, r"key '5': layer out of range \(tiny has 3 layers\)"),
        ({"layer0": [0]}, r"key 'layer0': expected a non-negative integer"),
        ({"0": 1}, r"key '0': expected a list of KV head ids"),
        ([[0]], r"expected a JSON object"),
    ],
)
def test_razor_attention_malformed(tmp_path, data, match):
    src = tmp_path / "razor.json"
    src.write_text(json.dumps(data))
    with pytest.raises(ImportFormatError, match=match):
        import_policy("razor-attention", src, INFO)


# ---- common -------------------------------------------------------------------------------------
def test_import_errors_are_policy_errors_and_name_the_problem(tmp_path):
    assert issubclass(ImportFormatError, PolicyError)
    with pytest.raises(ImportFormatError, match="unknown import format 'h2o'.*duo-attention"):
        import_policy("h2o", tmp_path, INFO)
    with pytest.raises(ImportFormatError, match="no such file"):
        import_policy("razor-attention", tmp_path / "missing.json", INFO)
    tsv = write_duo(tmp_path)
    with pytest.raises(BudgetError, match="either a budget or a threshold"):
        import_policy("duo", tsv, INFO, budget=0.5, threshold=0.5)
    with pytest.raises(BudgetError, match=r"in \[0, 1\]"):
        import_policy("duo", tsv, INFO, budget=1.5)
    assert format_names() == ["duo-attention", "razor-attention", "retrieval-head"]


def test_budget_ties_go_to_the_lower_layer_and_head(tmp_path):
    tsv = write_duo(tmp_path, gates=[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    p = import_policy("duo", tsv, INFO, budget=0.5)
    assert np.array(table(p)).tolist() == [[True, True], [True, False], [False, False]]


def test_read_source_checks_syntax_without_a_model(tmp_path):
    """What `headpolicy import` checks before it loads the model; the shape checks come after."""
    tsv = write_duo(tmp_path, gates=[[0.9, 0.1, 0.3]], config={"sink_size": 8, "recent_size": 16})
    source = read_source("duo", tmp_path)  # one line of three gates: fine for the syntax
    assert source.format.name == "duo-attention" and source.path == tsv
    with pytest.raises(ImportFormatError, match="expected 2 tab-separated gate values"):
        policy_from_source(source, INFO)
    tsv.write_text("0.9\tx\n")
    with pytest.raises(ImportFormatError, match="column 2: expected a number"):
        read_source("duo", tmp_path)
    razor = tmp_path / "razor.json"
    razor.write_text('{"7": [0, 9]}')  # out of range for INFO, but only the model can say so
    assert read_source("razor", razor).parsed == {7: ("7", [0, 9])}


def test_policy_from_source_is_import_policy(tmp_path):
    write_duo(tmp_path, config={"sink_size": 16, "recent_size": 32})
    assert policy_from_source(read_source("duo", tmp_path), INFO, budget=0.5) == import_policy(
        "duo", tmp_path, INFO, budget=0.5
    )


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"sink": MAX_TOKENS + 1}, PolicyError, r"sink: expected an integer from 0 to MAX_TOKENS = 2147483647"),
        ({"window": 0}, PolicyError, r"window: expected an integer from 1 to MAX_TOKENS"),
        ({"threshold": float("nan")}, BudgetError, r"threshold must be a finite number"),
        ({"budget": -0.1}, BudgetError, r"in \[0, 1\]"),
    ],
)
def test_check_options(tmp_path, options, error, match):
    source = read_source("duo", write_duo(tmp_path))
    with pytest.raises(error, match=match):
        check_options(source, **options)
    with pytest.raises(error, match=match):
        import_policy("duo", source.path, INFO, **options)
    check_options(source, sink=MAX_TOKENS, window=MAX_TOKENS, threshold=0.3)
