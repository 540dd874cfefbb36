import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headpolicy.errors import BudgetError
from headpolicy.policies.select import budget_heads, rank_heads, select_budget, select_closed_loop, select_top


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 8),
    st.integers(1, 4),
    st.floats(0, 1),
    st.integers(0, 2**31 - 1),
)
def test_budget_is_met_exactly(layers, heads, budget, seed):
    scores = np.random.default_rng(seed).integers(0, 3, size=(layers, heads)).astype(float)  # many ties
    table = select_budget(scores, budget)
    assert table.shape == (layers, heads) and table.dtype == bool
    assert int(table.sum()) == budget_heads(budget, layers * heads)
    # every kept head scores at least as high as every dropped head
    if table.any() and (~table).any():
        assert scores[table].min() >= scores[~table].max()
    np.testing.assert_array_equal(table, select_budget(scores.copy(), budget))  # deterministic


def test_ties_go_to_lower_layer_then_head():
    scores = np.zeros((3, 2))
    assert rank_heads(scores)[:3] == [(0, 0), (0, 1), (1, 0)]
    assert select_top(scores, 3).tolist() == [[True, True], [True, False], [False, False]]


def test_budget_rounds_half_up():
    assert budget_heads(0.25, 90) == 23  # 22.5 -> 23
    assert budget_heads(0.0, 90) == 0 and budget_heads(1.0, 90) == 90


def test_min_per_layer():
    scores = np.array([[9.0, 8.0], [7.0, 6.0], [0.0, 0.1]])
    table = select_top(scores, 3, min_per_layer=1)
    assert table.sum(axis=1).tolist() == [2, 0, 1] or table.sum(axis=1).min() >= 1
    assert table[2, 1] and table.sum() == 3 and table.sum(axis=1).min() == 1


@pytest.mark.parametrize("budget", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_budget(budget):
    with pytest.raises(BudgetError):
        select_budget(np.ones((2, 2)), budget)


def test_impossible_min_per_layer():
    with pytest.raises(BudgetError, match="cannot give each of 4 layers 1"):
        select_budget(np.ones((4, 3)), 0.2, min_per_layer=1)


def test_bad_scores():
    with pytest.raises(BudgetError, match="NaN"):
        select_budget(np.array([[1.0, np.nan]]), 0.5)


def test_closed_loop_finds_smallest_passing_budget():
    scores = np.arange(20, dtype=float).reshape(10, 2)
    calls = []

    def evaluate(table):
        calls.append(int(table.sum()))
        return 100.0 if table.sum() >= 6 else 50.0  # needs 6 of 20 heads

    res = select_closed_loop(scores, evaluate, full_accuracy=100.0, tolerance=2.0)
    assert res.budget == 0.3 and int(res.table.sum()) == 6 and res.accuracy == 100.0
    assert len(calls) <= 5 and 20 not in calls  # all-retrieval is the full model: never run
    assert [t["retrieval_heads"] for t in res.trace if t["evaluated"]] == calls
    again = select_closed_loop(scores, evaluate, full_accuracy=100.0, tolerance=2.0)
    np.testing.assert_array_equal(again.table, res.table)


def test_closed_loop_impossible_target():
    with pytest.raises(BudgetError, match="no budget up to 0.50"):
        select_closed_loop(np.ones((4, 2)), lambda t: 0.0, full_accuracy=100.0, tolerance=1.0,
                           budgets=(0.25, 0.5))  # fmt: skip
    with pytest.raises(BudgetError, match="tolerance"):
        select_closed_loop(np.ones((4, 2)), lambda t: 0.0, full_accuracy=100.0, tolerance=-1)
