"""HeadPolicy: round trip, strict validation with named errors, atomic save, fuzzed loader."""

import copy

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from headpolicy import HeadPolicy, HeadSpec, ModelInfo, PolicyError, PolicyMismatchError, Provenance
from headpolicy.policies.schema import MAX_TOKENS

INFO = ModelInfo("toy", "LlamaForCausalLM", 3, 6, 2, 16, "sha256:abc")


def make_policy(**kw) -> HeadPolicy:
    return HeadPolicy.from_kinds(
        INFO,
        [[True, False], [False, False], [False, True]],
        sink=4,
        window=32,
        scores=[[0.9, 0.1], [0.2, 0.05], [0.0, 0.7]],
        provenance=Provenance(version="0.1.0", method="retrieval", settings={"lengths": [1024, 2048]}, seed=3),
        results={"accuracy": {"full": 1.0, "policy": 0.98}},
        **kw,
    )


def test_round_trip_yaml(tmp_path):
    p = make_policy()
    layers = list(p.layers)
    layers[1] = (HeadSpec("streaming", sink=0, window=7, score=0.2), layers[1][1])
    p = p.replace(layers=tuple(layers))
    assert HeadPolicy.from_yaml(p.to_yaml()) == p
    path = p.save(tmp_path / "sub" / "policy.yaml")
    assert HeadPolicy.load(path) == p
    assert p.head_window(1, 0) == (0, 7) and p.head_window(1, 1) == (4, 32)


def test_counts_and_bytes():
    p = make_policy()
    assert p.num_retrieval == 2 and p.num_heads == 6
    assert p.kv_tokens(100) == 2 * 100 + 4 * 36
    assert p.kv_tokens(10) == 6 * 10  # short contexts: nothing is dropped
    assert p.kv_bytes(100, batch=2, dtype_bytes=2) == 2 * 2 * 16 * 2 * (2 * 100 + 4 * 36)
    assert p.kv_fraction(100) == pytest.approx((200 + 144) / 600)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "policy.yaml"
    make_policy().save(path)
    before = path.read_text()

    def boom(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr("os.fsync", lambda fd: boom(None))
    with pytest.raises(RuntimeError):
        make_policy().replace(window=64).save(path)
    assert path.read_text() == before
    assert [f.name for f in tmp_path.iterdir()] == ["policy.yaml"]  # no temp file left behind


def mutate(path, value):
    d = make_policy().to_dict()
    d = yaml.safe_load(yaml.safe_dump(copy.deepcopy(_plain(d))))
    *parents, last = path
    node = d
    for k in parents:
        node = node[k]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return yaml.safe_dump(d)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


DELETE = object()


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("schema",), "headpolicy/v9", "unsupported schema 'headpolicy/v9'"),
        (("schema",), DELETE, "missing required key 'schema'"),
        (("model", "num_layers"), 4, "expected 4 layers"),
        (("model", "num_kv_heads"), 3, "expected 3 heads"),
        (("model", "num_attention_heads"), 7, "not a multiple of num_kv_heads"),
        (("model", "head_dim"), "64", "model.head_dim: expected an integer"),
        (("model", "fingerprint"), DELETE, "model: missing required key 'fingerprint'"),
        (("model", "colour"), "red", "model: unknown key 'colour'"),
        (("defaults", "window"), 0, "defaults.window: expected an integer from 1 to MAX_TOKENS = 2147483647, got 0"),
        (("defaults", "sink"), 10**30, "defaults.sink: expected an integer from 0 to MAX_TOKENS = 2147483647"),
        (("defaults", "window"), 2**31, "defaults.window: expected an integer from 1 to MAX_TOKENS"),
        (("layers", 1, "heads", 0, "sink"), 10**30, "layer 1 head 0.sink: expected an integer from 0 to MAX_TOKENS"),
        (("layers", 1, "heads", 1, "window"), 2**31, "layer 1 head 1.window: expected an integer from 1 to MAX_TOKENS"),
        (("defaults", "sink"), True, "defaults.sink: expected an integer"),
        (("layers", 1, "heads", 0, "kind"), "sliding", "layer 1 head 0.kind: expected one of retrieval, streaming"),
        (("layers", 2, "heads", 1, "window"), -3, "layer 2 head 1.window"),
        (("layers", 0, "heads", 0, "score"), float("nan"), "layer 0 head 0.score: expected a finite number"),
        (("layers", 0, "heads", 0, "sink"), 4, "layer 0 head 0: a retrieval head keeps every token"),
        (("layers", 1, "layer"), 5, "layers[1].layer: expected 1"),
        (("layers", 1, "heads"), "all", "layers[1].heads: expected a list of 2 heads"),
        (("layers",), {"0": []}, "layers: expected a list of 3 layers"),
        (("provenance", "seed"), "x", "provenance.seed"),
        (("extra",), 1, "policy: unknown key 'extra'"),
    ],
)
def test_bad_policies_raise_named_errors(path, value, message):
    with pytest.raises(PolicyError) as e:
        HeadPolicy.from_yaml(mutate(path, value))
    assert message in str(e.value)


def test_sink_and_window_are_capped_at_max_tokens():
    """Out-of-range values used to load and then overflow inside generate (int too big to convert)."""
    p = make_policy()
    top = p.replace(sink=MAX_TOKENS, window=MAX_TOKENS)
    assert HeadPolicy.from_yaml(top.to_yaml()) == top  # the cap itself is a valid value
    with pytest.raises(PolicyError, match=r"defaults.window: expected an integer from 1 to MAX_TOKENS = 2147483647"):
        p.replace(window=MAX_TOKENS + 1)  # policies made in code are held to the same bound
    layers = list(p.layers)
    layers[1] = (HeadSpec("streaming", sink=10**30), layers[1][1])
    with pytest.raises(PolicyError, match=r"layer 1 head 0.sink: expected an integer from 0 to MAX_TOKENS"):
        p.replace(layers=tuple(layers))
    hybrid = ModelInfo(**{**INFO.__dict__, "native_windows": (None, 2**40, None)})
    with pytest.raises(PolicyError, match=r"model.native_windows\[1\]: expected an integer from 1 to MAX_TOKENS"):
        HeadPolicy.from_kinds(hybrid, [[True, False]] * 3)


@pytest.mark.parametrize("text", ["", "[1, 2]", "schema: [", "42", "{a: 1}", "!!python/object:os.system {}"])
def test_not_a_policy(text):
    with pytest.raises(PolicyError):
        HeadPolicy.from_yaml(text)


def test_missing_file_is_a_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        HeadPolicy.load(tmp_path / "nope.yaml")


def test_check_model():
    p = make_policy()
    p.check_model(INFO)
    with pytest.raises(PolicyMismatchError, match="policy is for 3 layers x 2 KV heads"):
        p.check_model(ModelInfo("big", "LlamaForCausalLM", 24, 64, 8, 128, "sha256:abc"))
    other = ModelInfo(**{**INFO.__dict__, "fingerprint": "sha256:def"})
    with pytest.raises(PolicyMismatchError, match="fingerprint"):
        p.check_model(other)
    p.check_model(other, check_fingerprint=False)


# ---- fuzzing: the loader raises PolicyError subclasses and nothing else ----------------------
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)),
    max_leaves=12,
)


def _load_or_policy_error(text):
    try:
        HeadPolicy.from_yaml(text)
    except PolicyError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_arbitrary_text(text):
    _load_or_policy_error(text)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_policy(data):
    d = _plain(make_policy().to_dict())
    node, path = d, []
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(list(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append(key)
        if not isinstance(node[key], dict | list):
            break
        node = node[key]
    if path:
        parent = d
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = data.draw(_values)
    else:
        d = data.draw(_values)
    _load_or_policy_error(yaml.safe_dump(d, allow_unicode=True))
