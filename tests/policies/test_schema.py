"""HeadPolicy: round trip, strict validation with named errors, atomic save, fuzzed loader."""

import copy

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from headpolicy import HeadPolicy, HeadSpec, ModelInfo, PolicyError, PolicyMismatchError, Provenance
from headpolicy.policies import schema
from headpolicy.policies.schema import MAX_POLICY_BYTES, MAX_TOKENS
from tests import conftest

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
        (("layers", 0, "heads", 0, "score"), 10**400, "layer 0 head 0.score: expected a finite number"),
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


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[1, 2]",
        "schema: [",
        "42",
        "{a: 1}",
        "!!python/object:os.system {}",
        "created: 2001-13-01",  # a timestamp PyYAML recognises but cannot build (ValueError)
        "x: " + "1" * 5000,  # more digits than int() converts (ValueError)
    ],
)
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


# ---- bounded loading: hostile files fail at once (issue 12) ------------------------------------
# The timeouts turn a regression into a failure instead of a hang: without the bounds each of
# these inputs runs for minutes (the alias bomb expands to 9**9 nodes).
def alias_bomb(levels: int = 9) -> str:
    return conftest.alias_bomb(make_policy().to_yaml(), levels)


@pytest.mark.timeout(30)
def test_an_alias_bomb_is_refused(tmp_path):
    with pytest.raises(PolicyError, match=r"line \d+: expands to more than MAX_YAML_NODES = 250000 YAML nodes"):
        HeadPolicy.from_yaml(alias_bomb())
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(12))
    with pytest.raises(PolicyError, match=f"{path}: line"):
        HeadPolicy.load(path)


def test_a_few_aliases_are_still_fine():
    text = alias_bomb(2)  # 9 * 9 * 9 leaves
    assert len(HeadPolicy.from_yaml(text).results["a2"]) == 9


@pytest.mark.parametrize(
    ("insert", "match"),
    [
        ("  r: &r [1, *r]\n", r"line \d+: an alias refers to a node that contains it"),
        ("  d: " + "[" * 100 + "]" * 100 + "\n", r"nested more than MAX_YAML_DEPTH = 64 levels deep"),
        ("  d:\n" + "".join("  " * (i + 2) + "-\n" for i in range(100)), r"nested more than MAX_YAML_DEPTH"),
    ],
)
def test_recursive_and_deep_yaml_is_refused(insert, match):
    with pytest.raises(PolicyError, match=match):
        HeadPolicy.from_yaml(make_policy().to_yaml().replace("results:\n", "results:\n" + insert))


@pytest.mark.timeout(30)
def test_a_file_over_the_size_cap_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.yaml"
    with open(path, "w") as f:  # a 12 MB results list: minutes of parsing without the cap
        f.write(make_policy().to_yaml().replace("results:", "results:\n  x:"))
        f.write("  - 1\n" * (2 * 2**20))
    assert path.stat().st_size > MAX_POLICY_BYTES
    with pytest.raises(PolicyError, match=f"{path} is larger than MAX_POLICY_BYTES = 4194304 bytes"):
        HeadPolicy.load(path)
    with pytest.raises(PolicyError, match="more than MAX_POLICY_BYTES"):
        HeadPolicy.from_yaml(path.read_text())


@pytest.mark.timeout(30)
def test_a_device_without_a_size_is_read_only_up_to_the_cap():
    with pytest.raises(PolicyError, match="/dev/zero is larger than MAX_POLICY_BYTES"):
        HeadPolicy.load("/dev/zero")  # stat says 0 bytes; reading it all would never end


def test_node_and_alias_counts_are_capped_while_composing(monkeypatch):
    monkeypatch.setattr(schema, "MAX_YAML_NODES", 500)
    text = make_policy().to_yaml().replace("results:", "results:\n  x: [" + ", ".join(["1"] * 600) + "]\n  y:")
    with pytest.raises(PolicyError, match=r"line \d+: more than MAX_YAML_NODES = 500 YAML nodes"):
        HeadPolicy.from_yaml(text)
    monkeypatch.setattr(schema, "MAX_YAML_ALIASES", 3)
    with pytest.raises(PolicyError, match=r"more than MAX_YAML_ALIASES = 3 aliases"):
        HeadPolicy.from_yaml(alias_bomb(1))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.replace("{kind: retrieval, score: 0.9}", "{kind: streaming, kind: retrieval, score: 0.9}"),
         r"line 9: duplicate key 'kind' \(first at line 9\)"),
        (lambda t: t + "schema: headpolicy/v1\n", r"duplicate key 'schema' \(first at line 2\)"),
        (lambda t: t.replace("defaults: {sink: 4, window: 32", "defaults: {}\ndefaults: {sink: 4, window: 32"),
         r"duplicate key 'defaults'"),
        (lambda t: t.replace("  accuracy:", "  accuracy: 1\n  accuracy:"), r"duplicate key 'accuracy'"),
        (lambda t: t.replace("{kind: retrieval, score: 0.9}", "{kind: retrieval, score: 0.9, score: 9}"),
         r"duplicate key 'score'"),
    ],
)  # fmt: skip
def test_duplicate_keys_are_refused_at_any_level(edit, match):
    """YAML keeps the last of two equal keys; a file that says two things is refused instead."""
    with pytest.raises(PolicyError, match=match):
        HeadPolicy.from_yaml(edit(make_policy().to_yaml()))


def test_a_merge_key_may_be_overridden():
    merged = "results:\n  base: &b {x: 1, y: 2}\n  more: {<<: *b, y: 3}\n  z:"
    text = make_policy().to_yaml().replace("results:", merged)
    assert HeadPolicy.from_yaml(text).results["more"] == {"x": 1, "y": 3}


def test_saved_policies_hold_no_anchors_or_aliases():
    shared = {"lengths": [1024, 2048]}
    p = make_policy().replace(results={"a": shared, "b": shared, "c": [shared, shared]})
    text = p.to_yaml()
    assert "&" not in text and "*" not in text
    assert HeadPolicy.from_yaml(text) == p


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


# ---- KV precision (issue 14): kv_bits, schema v2 and the v1 migration --------------------------------
V1_TEXT = """\
schema: headpolicy/v1
model: {name: toy, architecture: LlamaForCausalLM, num_layers: 3, num_attention_heads: 6, num_kv_heads: 2,
  head_dim: 16, fingerprint: 'sha256:abc'}
defaults: {sink: 4, window: 32}
layers:
- layer: 0
  heads:
  - {kind: retrieval, score: 0.9}
  - {kind: streaming, score: 0.1}
- layer: 1
  heads:
  - {kind: streaming}
  - {kind: streaming, sink: 0, window: 7}
- layer: 2
  heads:
  - {kind: streaming}
  - {kind: retrieval}
"""


def bits_policy() -> HeadPolicy:
    return make_policy().replace(kv_bits=8, kv_group=16, kv_residual=8).replace(
        layers=(
            (HeadSpec("retrieval", score=0.9, kv_bits=4), HeadSpec("streaming", score=0.1, kv_bits=16)),
            (HeadSpec("streaming"), HeadSpec("streaming", sink=0, window=7, kv_bits=4)),
            (HeadSpec("streaming"), HeadSpec("retrieval", kv_bits=16)),
        )
    )


def test_a_v1_file_loads_as_native_precision_and_saves_as_v2(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(V1_TEXT)
    p = HeadPolicy.load(old)
    assert p.schema == schema.SCHEMA == "headpolicy/v2"
    assert p.bits_table() == [[16, 16]] * 3 and p.num_quantized == 0
    assert p.kv_bytes(100) == 2 * 16 * 4 * p.kv_tokens(100)  # what v1 meant: every token in the model's dtype
    new = p.save(tmp_path / "new.yaml")
    text = new.read_text()
    assert "schema: headpolicy/v2" in text and "kv_bits: 16" in text
    assert HeadPolicy.load(new) == p


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("{kind: streaming, score: 0.1}", "{kind: streaming, score: 0.1, kv_bits: 8}"),
         "layer 0 head 1: 'kv_bits' needs schema 'headpolicy/v2', the file says 'headpolicy/v1'"),
        (lambda t: t.replace("window: 32}", "window: 32, kv_group: 8}"),
         "defaults: 'kv_group' needs schema 'headpolicy/v2'"),
    ],
)  # fmt: skip
def test_a_v1_file_cannot_use_v2_keys(edit, message):
    with pytest.raises(PolicyError, match=message):
        HeadPolicy.from_yaml(edit(V1_TEXT))


def test_kv_bits_round_trip_and_defaults_resolve():
    p = bits_policy()
    assert HeadPolicy.from_yaml(p.to_yaml()) == p
    assert p.bits_table() == [[4, 16], [8, 4], [8, 16]]
    assert p.num_quantized == 4
    assert "# KV precision: 2 at 16 bits, 2 at 8 bits, 2 at 4 bits" in p.to_yaml()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("defaults", "kv_bits"), 3, "defaults.kv_bits: expected KV bits 16, 8, 4 (16 = the model's own dtype), got 3"),
        (("defaults", "kv_bits"), True, "defaults.kv_bits: expected KV bits 16, 8, 4"),
        (("layers", 1, "heads", 0, "kv_bits"), "8", "layer 1 head 0.kv_bits: expected KV bits 16, 8, 4"),
        (("layers", 2, "heads", 1, "kv_bits"), 2, "layer 2 head 1.kv_bits: expected KV bits 16, 8, 4 "),
        (("defaults", "kv_group"), 0, "defaults.kv_group: expected an integer from 1 to MAX_TOKENS"),
        (("defaults", "kv_residual"), -1, "defaults.kv_residual: expected an integer from 0 to MAX_TOKENS"),
        (("defaults", "kv_scale"), 1, "defaults: unknown key 'kv_scale'"),
    ],
)
def test_bad_kv_bits_raise_named_errors(path, value, message):
    with pytest.raises(PolicyError) as e:
        HeadPolicy.from_yaml(mutate(path, value))
    assert message in str(e.value)


def test_int4_needs_an_even_head_dim_and_policies_in_code_are_checked_too():
    odd = ModelInfo("odd", "LlamaForCausalLM", 1, 2, 2, 15, "sha256:abc")
    with pytest.raises(PolicyError, match="layer 0 head 1.kv_bits: 4-bit codes pack two channels a byte"):
        HeadPolicy.from_rules(odd, [[None, (1, 2)]], bits=[[8, 4]])
    HeadPolicy.from_rules(odd, [[None, (1, 2)]], bits=[[8, 8]])
    with pytest.raises(PolicyError, match="defaults.kv_bits"):
        make_policy().replace(kv_bits=12)
    with pytest.raises(PolicyError, match="a policy object is always 'headpolicy/v2'"):
        make_policy().replace(schema="headpolicy/v1")


def test_kv_bytes_count_codes_scales_and_residual():
    from headpolicy.policies.precision import kv_head_bytes

    p = bits_policy()
    for T in (1, 10, 36, 100, 1000):
        per_head = []
        for li in range(3):
            for hi in range(2):
                rule = {} if p.layers[li][hi].is_retrieval else dict(sink=p.head_window(li, hi)[0],
                                                                      window=p.head_window(li, hi)[1])  # fmt: skip
                per_head.append(kv_head_bytes(T, head_dim=16, dtype_bytes=2, bits=p.head_bits(li, hi), group=16,
                                              residual=8, **rule))  # fmt: skip
        assert p.kv_bytes(T, batch=3, dtype_bytes=2) == 3 * sum(per_head)
        assert p.kv_fraction(T, dtype_bytes=2) == pytest.approx(sum(per_head) / p.full_kv_bytes(T, dtype_bytes=2))
    native = make_policy()
    assert native.kv_fraction(100, dtype_bytes=2) == native.kv_fraction(100) == pytest.approx((200 + 144) / 600)
    assert p.kv_fraction(4096, dtype_bytes=4) < p.kv_fraction(4096, dtype_bytes=2) < native.kv_fraction(4096)


def test_from_rules_carries_bits():
    rules = [[None, (4, 32)], [(4, 32), (0, 7)], [(4, 32), None]]
    bits = [[4, 16], [8, 4], [8, 16]]
    p = HeadPolicy.from_rules(INFO, rules, bits=bits, kv_group=16, kv_residual=8)
    assert p.bits_table() == bits
    assert p.kv_bits == 16  # the most common entry is written once (ties: the larger)
    assert [h.kv_bits for h in p.layers[1]] == [8, 4] and p.layers[0][1].kv_bits is None
    assert HeadPolicy.from_rules(INFO, rules, bits=bits, kv_bits=8).layers[1][0].kv_bits is None
    assert HeadPolicy.from_kinds(INFO, [[True, False]] * 3, bits=[[8, 8]] * 3).kv_bits == 8


# ---- the compensation token (RazorAttention) ------------------------------------------------------
def comp_policy(**kw) -> HeadPolicy:
    """Layer 0: retrieval + compensated default; layer 1: own window, not compensated + default;
    layer 2: default + retrieval."""
    rules = [[None, (4, 32)], [(0, 7, False), (4, 32)], [(4, 32), None]]
    return HeadPolicy.from_rules(INFO, rules, defaults=(4, 32), compensate=True, **kw)


def test_compensation_round_trips_and_resolves_per_head(tmp_path):
    p = comp_policy()
    assert p.compensate and p.num_compensated == 3
    assert [[p.head_compensates(li, hi) for hi in range(2)] for li in range(3)] == [
        [False, True], [False, True], [True, False]
    ]  # fmt: skip
    assert p.layers[1][0].compensate is False and p.layers[0][1].compensate is None
    assert HeadPolicy.from_yaml(p.to_yaml()) == p
    assert HeadPolicy.load(p.save(tmp_path / "p.yaml")) == p
    text = p.to_yaml()
    assert "compensate: true" in text and "3 streaming heads keep a compensation token" in text


def test_policies_without_compensation_read_and_write_as_before():
    p = make_policy()
    assert not p.compensate and p.num_compensated == 0
    assert "compensate" not in p.to_yaml()
    d = _plain(p.to_dict())
    assert set(d["defaults"]) == {"sink", "window", "kv_bits", "kv_group", "kv_residual"}  # v2 defaults
    assert HeadPolicy.from_dict(d) == p  # an older file (no `compensate` anywhere) loads with it off


def test_compensation_counts_one_slot_and_its_float32_sums():
    p, plain = comp_policy(), comp_policy().replace(compensate=False)
    # plain: layer 1 head 0 still says compensate: false explicitly, so only the defaults differ
    assert plain.num_compensated == 0
    assert p.kv_tokens(100) == plain.kv_tokens(100) + 3
    assert p.kv_tokens(3) == 6 * 3 + 3  # the slot is allocated from the first token on
    D = INFO.head_dim
    for dtype_bytes in (2, 4, 8):
        extra = 3 * 2 * D * max(dtype_bytes, 4)
        assert p.kv_bytes(100, batch=2, dtype_bytes=dtype_bytes) == (
            plain.kv_bytes(100, batch=2, dtype_bytes=dtype_bytes) + 2 * extra
        )
    assert p.kv_fraction(100) == pytest.approx((plain.kv_tokens(100) + 3) / 600)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["layers"][0]["heads"][0].update(compensate=True),
         "layer 0 head 0: a retrieval head keeps every token, so it has nothing to compensate"),
        (lambda d: d["layers"][0]["heads"][0].update(compensate=False), "layer 0 head 0: a retrieval head"),
        (lambda d: d["layers"][1]["heads"][0].update(compensate="yes"),
         "layer 1 head 0.compensate: expected true or false, got 'yes'"),
        (lambda d: d["layers"][1]["heads"][0].update(compensate=1), "layer 1 head 0.compensate: expected true"),
        (lambda d: d["defaults"].update(compensate=None), "defaults.compensate: expected true or false, got None"),
        (lambda d: d["defaults"].update(compensate="on"), "defaults.compensate: expected true or false"),
    ],
)  # fmt: skip
def test_bad_compensation_raises_named_errors(edit, message):
    d = _plain(make_policy().to_dict())
    edit(d)
    with pytest.raises(PolicyError) as e:
        HeadPolicy.from_yaml(yaml.safe_dump(d))
    assert message in str(e.value)


def test_compensation_in_code_is_validated_too():
    p = make_policy()
    layers = list(p.layers)
    layers[0] = (HeadSpec("retrieval", compensate=True), layers[0][1])
    with pytest.raises(PolicyError, match="layer 0 head 0: a retrieval head keeps every token"):
        p.replace(layers=tuple(layers))
    with pytest.raises(PolicyError, match="defaults.compensate: expected true or false"):
        p.replace(compensate=1)


def test_native_sliding_layers_never_compensate():
    hybrid = ModelInfo(**{**INFO.__dict__, "native_windows": (None, 16, None)})
    p = HeadPolicy.from_kinds(hybrid, [[True, False]] * 3, sink=4, window=32, compensate=True)
    assert [p.head_compensates(1, h) for h in range(2)] == [False, False]
    assert p.num_compensated == 2 and HeadPolicy.from_yaml(p.to_yaml()) == p
    layers = list(p.layers)
    layers[1] = (HeadSpec("streaming", sink=0, window=16), layers[1][1])  # inherits compensate: true
    with pytest.raises(PolicyError, match="layer 1 head 0: layer 1 is the model's own sliding-window layer"):
        p.replace(layers=tuple(layers))


def test_plan_groups_streaming_heads_by_compensation():
    from headpolicy.policies.plan import plan_layers

    info = ModelInfo("toy", "LlamaForCausalLM", 1, 8, 4, 16, "sha256:abc")
    rules = [[(4, 32, True), None, (4, 32, False), (4, 32, True)]]
    (plan,) = plan_layers(HeadPolicy.from_rules(info, rules))
    assert plan.perm == (1, 2, 0, 3)
    assert [(g.start, g.stop, g.compensate) for g in plan.groups] == [(1, 2, False), (2, 4, True)]
    assert plan.compensated and plan.head_compensate == (False, False, True, True)
    (plain,) = plan_layers(HeadPolicy.from_rules(info, [[(4, 32), None, (4, 32), (4, 32)]]))
    assert not plain.compensated and len(plain.groups) == 1


# ---- KV precision and the compensation token together ---------------------------------------------
def test_a_v1_file_with_compensation_loads_as_v2():
    text = V1_TEXT.replace("window: 32}", "window: 32, compensate: true}").replace(
        "{kind: streaming, sink: 0, window: 7}", "{kind: streaming, sink: 0, window: 7, compensate: false}"
    )
    p = HeadPolicy.from_yaml(text)
    assert p.schema == "headpolicy/v2" and p.compensate and p.num_quantized == 0
    assert [[p.head_compensates(li, hi) for hi in range(2)] for li in range(3)] == [
        [False, True], [True, False], [True, False]
    ]  # fmt: skip
    assert HeadPolicy.from_yaml(p.to_yaml()) == p


def test_quantised_retrieval_heads_and_compensated_streaming_heads_mix():
    rules = [[None, (4, 32)], [(0, 7, False), (4, 32)], [(4, 32), None]]
    bits = [[8, 16], [4, 16], [16, 4]]
    p = HeadPolicy.from_rules(INFO, rules, bits=bits, kv_group=16, kv_residual=8, compensate=True)
    assert p.num_quantized == 3 and p.num_compensated == 3
    assert HeadPolicy.from_yaml(p.to_yaml()) == p
    plain = p.replace(compensate=False)
    extra = 3 * (2 * INFO.head_dim * 4)  # three compensated heads' float32 sums
    for dtype_bytes in (2, 4):
        assert p.kv_bytes(100, dtype_bytes=dtype_bytes) == plain.kv_bytes(100, dtype_bytes=dtype_bytes) + extra
        assert p.kv_bytes(100, dtype_bytes=dtype_bytes) == sum(
            p.head_kv_bytes(li, hi, 100, dtype_bytes=dtype_bytes) for li in range(3) for hi in range(2)
        )


def test_a_quantised_compensated_head_is_refused_by_name():
    from headpolicy.errors import QuantizedCompensationError
    from headpolicy.policies.plan import StreamGroup

    rules = [[None, (4, 32)], [(4, 32), (4, 32)], [(4, 32), None]]
    with pytest.raises(QuantizedCompensationError, match="layer 1 head 1: a compensation token on a quantised head"):
        HeadPolicy.from_rules(INFO, rules, bits=[[16, 16], [16, 8], [16, 16]], compensate=True)
    d = _plain(comp_policy().to_dict())
    d["layers"][0]["heads"][1]["kv_bits"] = 4
    with pytest.raises(PolicyError, match="layer 0 head 1: a compensation token on a quantised head .kv_bits 4."):
        HeadPolicy.from_yaml(yaml.safe_dump(d))
    d["layers"][0]["heads"][1]["compensate"] = False  # the same head uncompensated is fine
    assert HeadPolicy.from_yaml(yaml.safe_dump(d)).head_bits(0, 1) == 4
    with pytest.raises(QuantizedCompensationError, match="kv_bits 8"):
        StreamGroup(0, 2, 4, 8, bits=8, compensate=True)
