import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headpolicy.errors import BudgetError
from headpolicy.policies.select import allocate, budget_heads, rank_heads, select_budget, select_top, smallest_passing


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


def test_smallest_passing_bisects_and_reports_every_budget():
    calls = []

    def check(b):
        calls.append(b)
        return b >= 0.3, f"result {b}"

    grid = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0)
    found = smallest_passing(grid, check)
    assert found.budget == 0.3 and found.result == "result 0.3"
    assert calls == [0.4, 0.2, 0.3]  # the middle passes: the largest is never measured
    assert [(b, ok) for b, ok, _ in found.trace] == [(b, b >= 0.3) for b in calls]
    for threshold in grid:  # whatever passes, bisection finds the smallest in at most log2(n) + 2 checks
        calls.clear()
        found = smallest_passing(grid, lambda b, t=threshold: (calls.append(b) or b >= t, b))
        assert found.budget == threshold and len(calls) <= 5
        assert calls[0] == 0.4 and (calls[1] == 1.0) == (threshold > 0.4)  # the largest only when the middle fails
    none = smallest_passing((0.25, 0.5, 0.75), lambda b: (False, b))
    assert none.budget is None and [b for b, _, _ in none.trace] == [0.5, 0.75]  # nothing else tried


def test_allocate_is_the_exact_knapsack_optimum():
    rng = np.random.default_rng(0)
    for _ in range(150):
        H, n = rng.integers(1, 6), rng.integers(1, 4)
        loss = rng.normal(size=(H, n))
        cost = rng.integers(0, 6, size=(H, n)) * 64
        budget = int(rng.integers(cost.min(1).sum(), cost.max(1).sum() + 1))
        choice = allocate(loss, cost, budget)
        assert cost[np.arange(H), choice].sum() <= budget
        feasible = [c for c in itertools.product(range(n), repeat=H) if cost[np.arange(H), c].sum() <= budget]
        best = min(loss[np.arange(H), c].sum() for c in feasible)
        assert loss[np.arange(H), choice].sum() == pytest.approx(best, abs=1e-9)
        allowed = rng.random((H, n)) < 0.7
        allowed[np.arange(H), rng.integers(0, n, size=H)] = True  # every head keeps an option
        feasible = [c for c in feasible if allowed[np.arange(H), c].all()]
        if feasible:  # the optimum among the allowed options
            choice = allocate(loss, cost, budget, allowed)
            assert allowed[np.arange(H), choice].all() and cost[np.arange(H), choice].sum() <= budget
            best = min(loss[np.arange(H), c].sum() for c in feasible)
            assert loss[np.arange(H), choice].sum() == pytest.approx(best, abs=1e-9)


def test_allocate_equal_costs_is_top_k_and_impossible_budgets_fail():
    scores = np.array([0.9, 0.1, 0.5, 0.7])  # loss of streaming each head
    loss = np.stack([np.zeros(4), scores], axis=1)  # options: retrieval (cost 4), streaming (cost 1)
    cost = np.tile([4, 1], (4, 1))
    assert allocate(loss, cost, 4 + 4 + 1 + 1).tolist() == [0, 1, 1, 0]  # the two best heads keep everything
    with pytest.raises(BudgetError, match="cheapest option"):
        allocate(loss, cost, 3)
    with pytest.raises(BudgetError, match="cheapest option"):  # head 0 may not stream: 4 + 1 + 1 + 1 > 6
        allocate(loss, cost, 6, allowed=np.array([[True, False]] + [[True, True]] * 3))
    with pytest.raises(BudgetError, match="leaving every head an option"):
        allocate(loss, cost, 16, allowed=np.array([[False, False]] + [[True, True]] * 3))
