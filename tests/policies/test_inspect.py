"""`headpolicy inspect` / `diff`: table, KV fractions, heat map PNG, Spearman, changed heads."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headpolicy import HeadPolicy, ModelInfo, PolicyMismatchError
from headpolicy.cli import main
from headpolicy.policies.inspect import diff_policies, format_diff, format_inspect, save_heatmap
from headpolicy.policies.stats import rankdata, spearman

INFO = ModelInfo("tiny", "LlamaForCausalLM", 4, 6, 3, 16, "sha256:0123")
SCORES = [[0.9, 0.1, 0.3], [0.2, 0.8, 0.05], [0.0, 0.0, 0.4], [0.7, 0.6, 0.5]]
TABLE = [[s >= 0.5 for s in row] for row in SCORES]


def policy(table=TABLE, scores=SCORES, **kw):
    return HeadPolicy.from_kinds(INFO, table, scores=scores, sink=4, window=60, **kw)


def test_format_inspect_has_table_and_kv_fractions():
    p = policy()
    text = format_inspect(p)
    assert "5/12 KV heads" in text
    for label, ctx in (("1K", 1024), ("4K", 4096), ("32K", 32768), ("128K", 131072)):
        assert f"{label} {100 * p.kv_fraction(ctx):.1f}%" in text
    rows = [line.split() for line in text.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert rows[0][1:3] == ["1/3", "0"] and rows[0][3:] == ["0.900*", "0.100", "0.300"]
    assert rows[2][1:3] == ["0/3", "-"]
    assert rows[3][2] == "0,1,2"


def test_format_inspect_without_scores():
    text = format_inspect(policy(scores=None))
    assert "scores" not in text.split("layer")[-1] and "KV cache vs full" in text


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.parametrize("scores", [SCORES, None])
def test_heatmap_png(tmp_path, scores):
    out = save_heatmap(policy(scores=scores), tmp_path / "maps" / "p.png")
    w, h = _png_size(out)
    assert w > 300 and h > 300
    assert [p.name for p in out.parent.iterdir()] == ["p.png"]  # no temporary file left


def test_importing_inspect_does_not_import_matplotlib():
    code = "import sys, headpolicy.policies.inspect, headpolicy.cli; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: a -> [1, 2.5, 2.5, 4]; scipy.stats.spearmanr gives 0.9486832980505138
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138, abs=1e-12)
    assert rankdata([3.0, 1.0, 3.0, 2.0]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.floats(-1e3, 1e3)), min_size=3, max_size=30))
def test_spearman_properties(pairs):
    a = np.array([p[0] for p in pairs], dtype=float)
    b = np.array([p[1] for p in pairs])
    rho = spearman(a, b)
    if np.isnan(rho):
        assert len(set(a)) == 1 or len(set(b)) == 1
        return
    assert -1 - 1e-9 <= rho <= 1 + 1e-9
    assert spearman(b, a) == pytest.approx(rho)
    assert spearman(np.exp(a), b) == pytest.approx(rho)  # rank-based: monotone maps change nothing
    assert spearman(-a, b) == pytest.approx(-rho)


def test_diff_lists_changed_heads_and_rank_correlation():
    a = policy()
    b_table = [list(r) for r in TABLE]
    b_table[0][0], b_table[2][2] = False, True
    b_scores = [list(r) for r in SCORES]
    b_scores[0][0], b_scores[2][2] = 0.3, 0.95
    b = policy(b_table, b_scores)
    d = diff_policies(a, b)
    assert [(c.layer, c.head, c.before, c.after) for c in d.changed_kind] == [
        (0, 0, "retrieval", "streaming(4,60)"),
        (2, 2, "streaming(4,60)", "retrieval"),
    ]
    assert d.spearman == pytest.approx(spearman(np.ravel(SCORES), np.ravel(b_scores)))
    assert 0 < d.spearman < 1 and d.scored_heads == 12
    text = format_diff(d, a, b)
    assert "heads that changed kind: 2" in text and "layer   0 head   0: retrieval -> streaming(4,60)" in text
    assert diff_policies(a, a).changed_kind == () and diff_policies(a, a).spearman == pytest.approx(1.0)


def test_diff_window_changes_missing_scores_and_shape_mismatch():
    a = policy()
    b = policy(scores=None).replace(window=128)
    d = diff_policies(a, b)
    assert d.changed_kind == () and len(d.changed_window) == 7 and d.spearman is None
    assert "n/a" in format_diff(d, a, b)
    other = HeadPolicy.from_kinds(ModelInfo("big", "X", 5, 6, 3, 16, "sha256:1"), [[True] * 3] * 5)
    with pytest.raises(PolicyMismatchError, match="different shapes"):
        diff_policies(a, other)


def test_cli_inspect_and_diff(tmp_path, capsys):
    pa, pb = tmp_path / "a.yaml", tmp_path / "b.yaml"
    policy().save(pa)
    policy(scores=[[s * s for s in r] for r in SCORES]).save(pb)
    assert main(["inspect", str(pa), "--png", str(tmp_path / "a.png")]) == 0
    out = capsys.readouterr().out
    assert "5/12 KV heads" in out and "32K" in out and "a.png" in out
    _png_size(tmp_path / "a.png")
    assert main(["diff", str(pa), str(pb)]) == 0
    out = capsys.readouterr().out
    assert "heads that changed kind: 0" in out and "Spearman, 12 heads): 1.000" in out
    (tmp_path / "bad.yaml").write_text("schema: headpolicy/v1\nmodel: 3\nlayers: []\n")
    assert main(["inspect", str(tmp_path / "bad.yaml")]) == 2
    assert "PolicyError" in capsys.readouterr().err


def test_format_inspect_shows_bits_per_head_and_the_bytes_they_imply():
    bits = [[8, 16, 4], [16, 16, 16], [4, 4, 4], [8, 8, 8]]
    p = policy(bits=bits, kv_group=16, kv_residual=8)
    text = format_inspect(p)
    assert "KV bits     16 bits: 4 heads, 8 bits: 4 heads, 4 bits: 4 heads" in text
    for name, size in (("float32", 4), ("bfloat16", 2)):
        line = next(x for x in text.splitlines() if x.startswith(f"KV cache vs full {name}:"))
        frac, mib = 100 * p.kv_fraction(4096, dtype_bytes=size), p.kv_bytes(4096, dtype_bytes=size) / 2**20
        assert f"4K {frac:.1f}% {mib:.2f} MiB" in line
    rows = [line.split() for line in text.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert rows[0][3:] == ["R@8", "(0.900)", "4+60", "(0.100)", "4+60@4", "(0.300)"]
    d = diff_policies(policy(), p)
    assert any(c.after == "retrieval@8" for c in d.changed_window)
    assert "heads with another sink/window, KV bits or compensation: 8" in format_diff(d, policy(), p)


def test_inspect_and_diff_show_compensation():
    rules = [[None if keep else (4, 60) for keep in row] for row in TABLE]
    rules[0][1] = (4, 60, False)
    p = HeadPolicy.from_rules(INFO, rules, scores=SCORES, compensate=True)
    text = format_inspect(p)
    assert "compensate  6 streaming heads keep a compensation token" in text
    assert "4+60+c" in text and "4+60 (0.100)" in text
    d = diff_policies(policy(), p)
    assert len(d.changed_window) == 6 and not d.changed_kind
    assert "streaming(4,60,compensated)" in format_diff(d, policy(), p)
