"""Bad input at the command line: one named line on stderr and exit 2, found before the model loads.

Each test is a case of issue 12 that used to exit 1 with a traceback, hang, or load the model first.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from headpolicy.cli import main
from headpolicy.policies.schema import MAX_TOKENS, HeadPolicy
from tests.conftest import policy_for, tiny_llama
from tests.test_checkpoint import save_checkpoint
from tests.test_models import write_gguf

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


# ---- user errors that used to be tracebacks (exit 1) --------------------------------------------------
def test_generate_refuses_an_empty_prompt(capsys, ckpt):
    rc, out, err = run(capsys, "generate", ckpt, "--prompt", "")
    assert_error(rc, err, "generate", "PromptError", "the prompt is empty")
    assert out == ""


def test_generate_refuses_a_prompt_longer_than_the_context(capsys, ckpt):
    """4095 prompt tokens + 32 new ones > the tiny model's 4096 positions: refused, not answered wrongly."""
    rc, out, err = run(capsys, "generate", ckpt, "--prompt", " ".join(["w5"] * 4095))
    assert_error(rc, err, "generate", "PromptError", "the prompt is 4095 tokens and 32 more are asked for")
    assert "at most 4096 tokens" in err and out == ""


@pytest.mark.parametrize("with_policy", [False, True])
def test_generate_warns_nothing_deprecated(tmp_path, capsys, ckpt, policy, with_policy):
    """transformers' past_key_values/cache deprecation reminders came from our own calls."""
    path = tmp_path / "p.yaml"
    policy.save(path)
    extra = ["--policy", path] if with_policy else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, out, err = run(capsys, "generate", ckpt, "--prompt", "w5 w6 w7", "--max-new-tokens", 3, *extra)
    assert rc == 0, err
    deprecated = [w for w in caught if issubclass(w.category, DeprecationWarning | FutureWarning)]
    assert deprecated == [], [f"{w.filename}:{w.lineno}: {w.message}" for w in deprecated]
    assert "past_key_values" not in err and "deprecated" not in err.lower()


@pytest.mark.parametrize("keep", [100, 0.5])
def test_compile_of_a_truncated_gguf_is_one_named_line(tmp_path, capsys, keep):
    data = write_gguf(tmp_path / "model.gguf").read_bytes()
    cut = tmp_path / "t.gguf"
    cut.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    out = tmp_path / "x.yaml"
    rc, _, err = run(capsys, "compile", cut, "-o", out, "--budget", "0.3")
    assert_error(rc, err, "compile", "ModelSourceError", f"cannot load {cut}: ")
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_inspect_png_into_a_directory(tmp_path, capsys, policy):
    path, target = tmp_path / "p.yaml", tmp_path / "maps"
    policy.save(path)
    target.mkdir()
    (target / "keep.txt").write_text("x")
    rc, _, err = run(capsys, "inspect", path, "--png", target)
    assert_error(rc, err, "inspect", "OutputError", f"cannot write {target}: it is a directory")
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]  # no .png.tmp left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps", "p.yaml"]


def test_inspect_png_below_a_regular_file(tmp_path, capsys, policy):
    path = tmp_path / "p.yaml"
    policy.save(path)
    rc, _, err = run(capsys, "inspect", path, "--png", path / "heads.png")
    assert_error(rc, err, "inspect", "OutputError", f"{path} is not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def attached(ckpt) -> Path:
    return ckpt / "head_policy.yaml"


def test_attach_where_the_policy_file_cannot_be(tmp_path, capsys, ckpt, policy):
    """head_policy.yaml taken by a directory: the write is impossible even for root."""
    path = tmp_path / "p.yaml"
    policy.save(path)
    attached(ckpt).mkdir()
    try:
        rc, _, err = run(capsys, "attach", ckpt, path)
        assert_error(rc, err, "attach", "OutputError", "head_policy.yaml: it is a directory")
        assert list(attached(ckpt).iterdir()) == []
    finally:
        attached(ckpt).rmdir()


def test_attach_into_a_folder_it_may_not_write(tmp_path, capsys, monkeypatch, ckpt, policy):
    """A read-only checkpoint (simulated: the tests run as root, who may write anywhere)."""
    path = tmp_path / "p.yaml"
    policy.save(path)
    before = sorted(p.name for p in ckpt.iterdir())

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(ckpt))

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    rc, _, err = run(capsys, "attach", ckpt, path)
    assert_error(rc, err, "attach", "OutputError", f"cannot write {attached(ckpt)}: Permission denied")
    assert sorted(p.name for p in ckpt.iterdir()) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_attach_into_a_read_only_checkpoint(tmp_path, capsys, policy):
    ckpt = save_checkpoint(tiny_llama(seed=3), tmp_path / "ro")
    path = tmp_path / "p.yaml"
    policy.save(path)
    ckpt.chmod(0o555)
    try:
        rc, _, err = run(capsys, "attach", ckpt, path)
    finally:
        ckpt.chmod(0o755)
    assert_error(rc, err, "attach", "OutputError", "Permission denied")
    assert not attached(ckpt).exists()


# ---- a reader that goes away: quiet exit 141 ------------------------------------------------------------
def headpolicy_process(*argv, **kw) -> subprocess.Popen:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "headpolicy", *map(str, argv)], env=env, cwd=root, **kw)


def test_a_closed_stdout_exits_141_without_a_traceback(tmp_path, policy):
    """The pipe's reader is gone before headpolicy writes: every write fails with EPIPE."""
    path = tmp_path / "p.yaml"
    policy.save(path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = headpolicy_process("inspect", path, stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == b"", err.decode()


def test_inspect_piped_into_head(tmp_path, policy):
    """`headpolicy inspect P | head -1` on a long policy: the first line, nothing on stderr."""
    from headpolicy import ModelInfo

    big = HeadPolicy.from_kinds(
        ModelInfo("big", "LlamaForCausalLM", 2000, 4, 2, 16, "sha256:1"), [[True, False]] * 2000
    )
    path = tmp_path / "big.yaml"
    big.save(path)
    proc = headpolicy_process("inspect", path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.run(["head", "-1"], stdin=proc.stdout, capture_output=True, timeout=120)
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read()
    proc.wait(timeout=120)
    assert head.stdout.decode().startswith("model       big (LlamaForCausalLM), 2000 layers")
    assert err == b"", err.decode()
    assert proc.returncode in (0, 141)  # 0 only if every line fit in the pipe before head exited


def test_main_returns_141_when_stdout_breaks(monkeypatch, tmp_path, policy):
    path = tmp_path / "p.yaml"
    policy.save(path)

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["inspect", str(path)]) == 141
