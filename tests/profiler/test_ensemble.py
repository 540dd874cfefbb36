"""Rank fusion of scorers and the agreement report."""

import numpy as np
import pytest

from headpolicy.profiler import tasks as T
from headpolicy.profiler.scorers import get_scorer, scorer_names
from headpolicy.profiler.scorers.ensemble import (
    agreement,
    format_agreement,
    fuse,
    overlap,
    ranks_best_first,
)
from tests.profiler.planted import planted_model


def test_ranks_best_first_share_ties():
    r = ranks_best_first(np.array([[0.5, 0.9], [0.5, 0.1]]))
    np.testing.assert_array_equal(r, [[2.5, 1.0], [2.5, 4.0]])


def test_fuse_is_scale_free():
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 4)), rng.random((3, 4))
    for rule in ("rrf", "borda"):
        np.testing.assert_allclose(fuse({"a": a, "b": b}, rule), fuse({"a": 1e6 * a, "b": np.exp(b)}, rule))
        np.testing.assert_array_equal(np.argsort(fuse({"a": a}, rule), axis=None), np.argsort(a, axis=None))


def test_rrf_keeps_a_head_one_scorer_puts_first():
    # head 0 is best for `a` and worst for `b`; the rest are shuffled independently
    rng = np.random.default_rng(1)
    a, b = rng.random(40), rng.random(40)
    a[0], b[0] = 2.0, -1.0
    parts = {"a": a.reshape(4, 10), "b": b.reshape(4, 10)}
    top = lambda x, k=4: set(np.argsort(-x.reshape(-1), kind="stable")[:k])
    assert 0 in top(fuse(parts, "rrf"))  # kept: one scorer says it is the most needed
    assert 0 not in top(fuse(parts, "borda"))  # averaged away to the middle


def test_fuse_errors():
    with pytest.raises(ValueError, match="at least one"):
        fuse({})
    with pytest.raises(ValueError, match="different shapes"):
        fuse({"a": np.zeros((2, 2)), "b": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="unknown fusion rule"):
        fuse({"a": np.zeros((2, 2))}, "mean")


def test_agreement_identical_and_reversed():
    a = np.arange(12, dtype=float).reshape(3, 4)
    res = agreement({"a": a, "same": 2 * a, "rev": -a}, budgets=(0.25, 0.5))
    pairs = {(p["a"], p["b"]): p for p in res["pairs"]}
    assert pairs["a", "same"]["spearman"] == pytest.approx(1.0)
    assert pairs["a", "same"]["overlap"] == {"0.25": 1.0, "0.5": 1.0}
    assert pairs["a", "rev"]["spearman"] == pytest.approx(-1.0)
    assert pairs["a", "rev"]["overlap"]["0.25"] == 0.0
    assert overlap(a, -a, 0.5) == 0.0
    text = format_agreement(res)
    assert "a / rev" in text and "-1.000" in text


def test_ensemble_scorer_is_registered_and_ranks_the_planted_head_first():
    assert {"gates", "ensemble"} <= set(scorer_names())
    codec = T.CharCodec(97)
    task = T.passkey(codec, 700, 0.5, seed=0)
    repeat = T.repeated_tokens(97, 301, seed=0, prefix=[1])
    model = planted_model(layer=1, head=1, offset=task.prompt_len - 1 - task.needle[0])
    scores = get_scorer("ensemble")(model, [task, repeat], sink=4, window=16)
    assert scores.shape == (2, 2)
    assert np.unravel_index(np.argmax(scores), scores.shape) == (1, 1), scores
