"""Bad input at the command line: one named line on stderr and exit 2, found before the model loads.

Each test is a case of issue 12 that used to exit 1 with a traceback, hang, or load the model first.
"""

import json

import pytest

from headpolicy.cli import main
from headpolicy.policies.schema import MAX_TOKENS, HeadPolicy
from tests.conftest import policy_for, tiny_llama
from tests.test_checkpoint import save_checkpoint

RETRIEVAL = [[True, False], [False, True]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny Llama checkpoint directory with a word-level tokenizer (words w4 .. w96)."""
    return save_checkpoint(tiny_llama(seed=3), tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(scope="module")
def policy(ckpt):
    from transformers import AutoModelForCausalLM

    return policy_for(AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True), RETRIEVAL)


@pytest.fixture
def loads(monkeypatch):
    """Records every model load the CLI asks for (and still loads it)."""
    import headpolicy.models
    import headpolicy.runtime.checkpoint

    calls = []
    real = headpolicy.models.load_source

    def spy(source, **kw):
        calls.append(str(source))
        return real(source, **kw)

    monkeypatch.setattr(headpolicy.models, "load_source", spy)
    monkeypatch.setattr(headpolicy.runtime.checkpoint, "load_source", spy)
    return calls


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `headpolicy ARGV` run in this process."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(rc, err, command, error, match=""):
    """Exit 2 and, as the last stderr line, `headpolicy COMMAND: ERROR: ...match...` (earlier lines
    can only be transformers' loading bars, never a traceback)."""
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert lines and "Traceback" not in err, err
    assert lines[-1].startswith(f"headpolicy {command}: {error}: "), err
    assert match in lines[-1], err


# ---- sink and window are bounded by MAX_TOKENS ------------------------------------------------------
def test_inspect_refuses_a_window_beyond_max_tokens(tmp_path, capsys, policy):
    """It used to load and show "KV 100%"; generate then crashed with OverflowError."""
    path = tmp_path / "huge.yaml"
    path.write_text(policy.to_yaml().replace("window: 8", "window: 1000000000000000000000000000000"))
    rc, out, err = run(capsys, "inspect", path)
    assert_error(rc, err, "inspect", "PolicyError", "defaults.window: expected an integer from 1 to MAX_TOKENS")
    assert out == ""


@pytest.mark.parametrize("option", ["--sink", "--window"])
def test_compile_refuses_sink_or_window_beyond_max_tokens(tmp_path, capsys, loads, ckpt, option):
    out = tmp_path / "p.yaml"
    rc, _, err = run(capsys, "compile", ckpt, "-o", out, "--budget", "0.5", option, MAX_TOKENS + 1)
    assert_error(rc, err, "compile", "BudgetError", f"(= {MAX_TOKENS})")
    assert loads == [] and not out.exists()


@pytest.mark.parametrize("option", ["--sink", "--window"])
def test_import_refuses_sink_or_window_beyond_max_tokens(tmp_path, capsys, loads, ckpt, option):
    src, out = tmp_path / "razor.json", tmp_path / "p.yaml"
    src.write_text(json.dumps({"0": [1]}))
    rc, _, err = run(capsys, "import", "razor-attention", src, "--model", ckpt, "-o", out, option, 10**30)
    assert_error(rc, err, "import", "PolicyError", f"{option[2:]}: expected an integer from")
    assert loads == [] and not out.exists()


def test_import_refuses_a_duo_attention_config_beyond_max_tokens(tmp_path, capsys, loads, ckpt):
    (tmp_path / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.6\n")
    (tmp_path / "config.json").write_text('{"sink_size": 100000000000000000000000000000, "recent_size": 8}')
    out = tmp_path / "p.yaml"
    rc, _, err = run(capsys, "import", "duo-attention", tmp_path, "--model", ckpt, "-o", out)
    assert_error(rc, err, "import", "ImportFormatError", "key 'sink_size': expected an integer from 0 to MAX_TOKENS")
    assert loads == [] and not out.exists()


def test_a_policy_at_max_tokens_still_generates(tmp_path, capsys, ckpt, policy):
    """The cap itself is a valid window: every token is kept, as with a retrieval head."""
    path = tmp_path / "wide.yaml"
    policy.replace(sink=MAX_TOKENS, window=MAX_TOKENS).save(path)
    rc, out, err = run(capsys, "generate", ckpt, "--policy", path, "--prompt", "w5 w6 w7", "--max-new-tokens", 2)
    assert rc == 0, err
    assert HeadPolicy.load(path).window == MAX_TOKENS


# ---- cheap inputs are checked before the model loads ------------------------------------------------
def test_generate_reads_the_policy_before_the_model(tmp_path, capsys, loads, ckpt):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: headpolicy/v1\nmodel: 3\nlayers: []\n")
    rc, _, err = run(capsys, "generate", ckpt, "--policy", bad, "--prompt", "w5")
    assert_error(rc, err, "generate", "PolicyError", "model: expected a mapping")
    rc, _, err = run(capsys, "generate", ckpt, "--policy", tmp_path / "missing.yaml", "--prompt", "w5")
    assert_error(rc, err, "generate", "PolicyError", "not found")
    assert loads == []


@pytest.mark.parametrize(
    ("fmt", "name", "text", "error", "match"),
    [
        ("h2o", "x.json", "{}", "ImportFormatError", "unknown import format 'h2o'"),
        ("razor-attention", None, None, "ImportFormatError", "no such file"),
        ("razor-attention", "r.json", '{"0": [1,]}', "ImportFormatError", "not valid JSON (line 1"),
        ("razor-attention", "r.json", '{"0": [-1]}', "ImportFormatError", "expected a KV head id"),
        ("retrieval-head", "r.json", '{"0-x": [0.5]}', "ImportFormatError", "expected a non-negative integer"),
        ("retrieval-head", "r.json", "[1, 2]", "ImportFormatError", "expected a JSON object"),
        ("duo-attention", "full_attention_heads.tsv", "0.9\tzero\n", "ImportFormatError", "line 1, column 2"),
        ("duo-attention", "full_attention_heads.tsv", "0.9\tinf\n", "ImportFormatError", "finite number"),
    ],
)
def test_import_checks_format_file_and_syntax_before_the_model(tmp_path, capsys, loads, ckpt, fmt, name, text,
                                                               error, match):  # fmt: skip
    src = tmp_path / (name or "missing.json")
    if text is not None:
        src.write_text(text)
    out = tmp_path / "p.yaml"
    rc, _, err = run(capsys, "import", fmt, src, "--model", ckpt, "-o", out)
    assert_error(rc, err, "import", error, match)
    assert loads == [] and not out.exists()


def test_import_checks_options_before_the_model(tmp_path, capsys, loads, ckpt):
    src, out = tmp_path / "r.json", tmp_path / "p.yaml"
    src.write_text('{"0": [1]}')
    rc, _, err = run(capsys, "import", "razor-attention", src, "--model", ckpt, "-o", out, "--budget", "0.5")
    assert_error(rc, err, "import", "BudgetError", "carry no scores")
    (tmp_path / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.6\n")
    rc, _, err = run(capsys, "import", "duo", tmp_path, "--model", ckpt, "-o", out, "--budget", "1.5")
    assert_error(rc, err, "import", "BudgetError", "in [0, 1]")
    assert loads == [] and not out.exists()


def test_import_checks_the_model_shape_after_loading_it(tmp_path, capsys, loads, ckpt):
    """The split keeps the shape checks: a file for a 3-layer model, loaded model has 2."""
    (tmp_path / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.6\n0.1\t0.1\n")
    out = tmp_path / "p.yaml"
    rc, _, err = run(capsys, "import", "duo", tmp_path, "--model", ckpt, "-o", out)
    assert_error(rc, err, "import", "ImportFormatError", "expected 2 lines (one per layer of tiny-llama), got 3")
    assert loads == [str(ckpt)] and not out.exists()
    (tmp_path / "full_attention_heads.tsv").write_text("0.9\t0.1\n0.2\t0.6\n")
    rc, out_text, err = run(capsys, "import", "duo", tmp_path, "--model", ckpt, "-o", out)
    assert rc == 0 and "2/4 retrieval KV heads" in out_text, err
