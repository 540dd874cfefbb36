"""Fuzzed command lines: random arguments and random files for inspect, diff, generate, import, attach.

Whatever the input, `headpolicy.cli.main` exits 0 or 2 (argparse's SystemExit(2) counts as 2)
and raises nothing; a failing command leaves an existing output file (`-o`, `--png`, the
checkpoint's head_policy.yaml) byte for byte as it was. The tiny checkpoint's model is loaded
once and copied per call, so the whole file runs in well under a minute.
"""

import contextlib
import copy
import io
import json
import os
import shutil

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import headpolicy.models
import headpolicy.runtime.checkpoint
from headpolicy.cli import main
from headpolicy.policies.schema import CHECKPOINT_FILE, HeadPolicy
from tests.conftest import alias_bomb, policy_for, tiny_llama
from tests.test_checkpoint import save_checkpoint

# 40 examples a command in `make test`; HEADPOLICY_FUZZ_EXAMPLES=2000 for a longer hunt.
FUZZ = settings(
    max_examples=int(os.environ.get("HEADPOLICY_FUZZ_EXAMPLES", 40)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
OLD_OUTPUT = b"an output that was here before the command ran\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A work folder (the current directory during the tests), a tiny checkpoint, a valid policy for
    it, and load_source answered from a cache: a deep copy of the model loaded once per source."""
    root = tmp_path_factory.mktemp("fuzz")
    ckpt = save_checkpoint(tiny_llama(seed=3), root / "ckpt")
    real_load, cache = headpolicy.models.load_source, {}

    def cached_load(source, **kw):
        key = (str(source), tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = real_load(source, **kw)  # errors (a bad source) are raised, never cached
        model, tok = cache[key]
        return copy.deepcopy(model), tok

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # a random relative path can only land here
        mp.setattr(headpolicy.models, "load_source", cached_load)
        mp.setattr(headpolicy.runtime.checkpoint, "load_source", cached_load)
        model, _ = cached_load(ckpt)
        yield {
            "root": root,
            "ckpt": ckpt,
            "policy": policy_for(model, [[True, False], [False, True]], sink=2, window=4),
        }


def run(argv) -> tuple[int, str]:
    """(exit code, stderr) of `headpolicy ARGV`; any exception but SystemExit fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse: 2 for a bad option, 0 for --help
            rc = 0 if e.code is None else e.code
    return rc, err.getvalue()


def check(argv, outputs=()) -> int:
    """Run ARGV; exit 0 or 2, a named reason on 2, and on failure every path in `outputs` unchanged."""
    before = {p: p.read_bytes() for p in outputs if p.is_file()}
    rc, err = run(argv)
    event(f"exit {rc}" + (f" {err.split(': ')[1]}" if rc == 2 and ": " in err else ""))  # --hypothesis-show-statistics
    assert rc in (0, 2), (argv, rc, err)
    if rc == 2:  # the reason, named ("headpolicy CMD: Error: ..." or argparse's "headpolicy CMD: error: ...")
        assert "Traceback" not in err and any(line.startswith("headpolicy") for line in err.split("\n")), (argv, err)
        for path, data in before.items():
            assert path.is_file() and path.read_bytes() == data, (argv, path, err)
    return rc


# ---- random inputs ----------------------------------------------------------------------------------------
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=6)
)
_values = st.recursive(
    _scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=5), kids, max_size=3)),
    max_leaves=8,
)
_numbers = st.one_of(
    st.integers(-3, 10), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["x", ""])
)


def _plain(x):
    """A policy dict as plain dicts and lists (the _Flow mappings become dict)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


@st.composite
def policy_texts(draw, policy: HeadPolicy) -> str:
    """Mostly near-valid policies for the checkpoint: one value replaced, or hostile YAML."""
    kind = draw(st.sampled_from(["valid", "mutated", "mutated", "text", "bomb", "duplicate", "sink"]))
    text = policy.to_yaml()
    if kind == "text":
        return draw(st.text(max_size=120))
    if kind == "bomb":
        return alias_bomb(text, draw(st.integers(1, 10)))
    if kind == "duplicate":
        return text + draw(st.sampled_from(["schema: headpolicy/v1\n", "model: {}\n", "layers: []\n"]))
    if kind == "sink":
        big = draw(st.sampled_from([-1, 0, 2**31 - 1, 2**31, 10**30]))
        return text.replace("sink: 2", f"sink: {big}")
    if kind == "mutated":
        d = _plain(policy.to_dict())
        node = d
        path = []
        while isinstance(node, dict | list) and node and draw(st.booleans()):
            key = draw(st.sampled_from(list(node) if isinstance(node, dict) else list(range(len(node)))))
            path.append(key)
            if not isinstance(node[key], dict | list):
                break
            node = node[key]
        if path:
            parent = d
            for k in path[:-1]:
                parent = parent[k]
            parent[path[-1]] = draw(_values)
        return yaml.safe_dump(d, allow_unicode=True)
    return text


def extras(*tokens):
    """Usually nothing; else a few random extra arguments: known options, numbers, unknown options."""
    token = st.one_of(st.sampled_from(tokens), st.text(max_size=6).map(lambda t: "--" + t), _numbers.map(str))
    return st.one_of(st.just([]), st.just([]), st.just([]), st.lists(token, min_size=1, max_size=2))


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    return path


# ---- the commands -----------------------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_fuzz_inspect(world, data):
    policy_file = write(world["root"] / "inspect.yaml", data.draw(policy_texts(world["policy"])))
    png = world["root"] / "heads.png"
    write(png, OLD_OUTPUT)
    argv = ["inspect", policy_file]
    if data.draw(st.booleans()):
        argv += ["--png", data.draw(st.sampled_from([png, world["root"], policy_file / "x.png"]))]
    check([*argv, *data.draw(extras("--png", "-v", "--help"))], outputs=[png, policy_file])


@FUZZ
@given(data=st.data())
def test_fuzz_diff(world, data):
    a = write(world["root"] / "a.yaml", data.draw(policy_texts(world["policy"])))
    b = write(world["root"] / "b.yaml", data.draw(policy_texts(world["policy"])))
    paths = st.sampled_from([a, b, a, b, world["root"] / "missing.yaml", world["root"]])
    names = data.draw(st.one_of(st.tuples(paths, paths), st.lists(paths, max_size=3)))
    check(["diff", *names, *data.draw(extras("-v"))])


@FUZZ
@given(data=st.data())
def test_fuzz_generate(world, data):
    policy_file = write(world["root"] / "generate.yaml", data.draw(policy_texts(world["policy"])))
    argv = ["generate", world["ckpt"], "--policy", policy_file, "--max-new-tokens", data.draw(st.integers(-1, 3))]
    if data.draw(st.booleans()):
        argv += ["--prompt", data.draw(st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "w5 w6 w7"])))]
    else:
        argv += ["--prompt", "w5 w9"]
    check([*argv, *data.draw(extras("--no-fingerprint-check", "--max-new-tokens", "--policy"))])


@st.composite
def import_files(draw) -> tuple[str, str, str | None]:
    """(format, the file's text, a DuoAttention config.json or None)."""
    fmt = draw(st.sampled_from(["duo-attention", "duo", "retrieval-head", "razor-attention", "h2o"]))
    cells = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text(max_size=4), _numbers.map(str))
    rows = st.lists(st.lists(cells, min_size=1, max_size=3), max_size=3)
    shape = draw(st.sampled_from(["valid", "near", "random"]))  # valid: for the 2-layer, 6-query-head checkpoint
    if fmt in ("duo-attention", "duo") and shape != "random":
        gates = rows if shape == "near" else st.lists(st.lists(st.floats(0, 1).map(repr), min_size=2, max_size=2),
                                                      min_size=2, max_size=2)  # fmt: skip
        text = "\n".join("\t".join(row) for row in draw(gates))
    elif fmt == "razor-attention" and shape != "random":
        keys, heads = (["0", "1"], st.integers(0, 1)) if shape == "valid" else (["0", "1", "2", "x", "-1"], _numbers)
        text = json.dumps(draw(st.dictionaries(st.sampled_from(keys), st.lists(heads, max_size=3), max_size=3)))
    elif fmt == "retrieval-head" and shape != "random":
        scores = {f"{layer}-{head}": [draw(st.floats(0, 1))] for layer in range(2) for head in range(6)}
        if shape == "near":
            keys = st.sampled_from(["0-0", "0-5", "1-6", "2-0", "0_1", "a-b", "0-0-0"])
            scores.update(draw(st.dictionaries(keys, st.one_of(st.lists(_scalars, max_size=2), _scalars), max_size=3)))
        text = json.dumps(scores)
    else:
        text = draw(st.one_of(st.text(max_size=60), _values.map(lambda v: json.dumps(v, allow_nan=True))))
    config = None
    if draw(st.booleans()):
        config = json.dumps(draw(st.dictionaries(st.sampled_from(["sink_size", "recent_size", "lr"]), _scalars)))
    return fmt, text, config


@FUZZ
@given(data=st.data())
def test_fuzz_import(world, data):
    fmt, text, config = data.draw(import_files())
    folder = world["root"] / "peer"
    shutil.rmtree(folder, ignore_errors=True)
    src = write(folder / ("full_attention_heads.tsv" if fmt.startswith("duo") else "pattern.json"), text)
    if config is not None:
        write(folder / "config.json", config)
    out = write(world["root"] / "imported.yaml", OLD_OUTPUT)
    argv = ["import", fmt, data.draw(st.sampled_from([src, folder])), "--model", world["ckpt"], "-o", out]
    for option in data.draw(st.lists(st.sampled_from(["--budget", "--threshold", "--sink", "--window"]), max_size=2)):
        argv += [option, data.draw(st.one_of(st.floats(0, 1), _numbers))]
    check([*argv, *data.draw(extras("--budget", "-o"))], outputs=[out])


@FUZZ
@given(data=st.data())
def test_fuzz_attach(world, data):
    ckpt = world["root"] / "attach-ckpt"
    if not ckpt.exists():
        shutil.copytree(world["ckpt"], ckpt)
    attached = ckpt / CHECKPOINT_FILE
    if attached.is_dir():
        attached.rmdir()
    before = data.draw(st.sampled_from(["none", "old bytes", "a folder"]))
    if before == "old bytes":
        write(attached, OLD_OUTPUT)
    elif before == "a folder":
        attached.unlink(missing_ok=True)
        attached.mkdir()
    else:
        attached.unlink(missing_ok=True)
    policy_file = write(world["root"] / "attach.yaml", data.draw(policy_texts(world["policy"])))
    target = data.draw(st.sampled_from([ckpt, world["root"] / "missing-ckpt", policy_file]))
    rc = check(["attach", target, policy_file, *data.draw(extras("--no-fingerprint-check"))], outputs=[attached])
    if rc == 2 and before == "a folder":
        assert attached.is_dir() and not any(attached.iterdir())
