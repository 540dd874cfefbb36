"""From head scores to a retrieval/streaming table.

(a) `select_budget`: the top `round(budget * num_heads)` KV heads by score stay retrieval
    (after each layer's top `min_per_layer`). Ties go to the lower (layer, head), so the
    same scores always give the same table.
(b) `allocate`: per head, one option out of several (retrieval, or streaming with a window from
    a ladder), the least summed loss within a byte budget (exact multiple-choice knapsack).
(c) `smallest_passing`: the smallest budget on a grid whose measured result passes a check
    (compile's `--target-drop`), by bisection; every budget tried is kept in the trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from headpolicy.errors import BudgetError
from headpolicy.policies.schema import finite_number


def _check_scores(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.size == 0:
        raise BudgetError(f"scores must be a non-empty [layers, kv_heads] array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise BudgetError("scores contain NaN or infinite values")
    return s


def budget_heads(budget: float, num_heads: int) -> int:
    """Retrieval heads for a fractional budget: round half up of budget * num_heads."""
    if finite_number(budget) is None:
        raise BudgetError(f"budget must be a number in [0, 1], got {budget!r}")
    if not 0.0 <= budget <= 1.0:
        raise BudgetError(f"budget must be a fraction of KV heads in [0, 1], got {budget}")
    return int(math.floor(budget * num_heads + 0.5))


def rank_heads(scores) -> list[tuple[int, int]]:
    """All (layer, head) pairs, best score first; ties by lower layer, then lower head."""
    s = _check_scores(scores)
    L, H = s.shape
    layer, head = np.divmod(np.arange(L * H), H)
    order = np.lexsort((head, layer, -s.reshape(-1)))
    return [(int(layer[i]), int(head[i])) for i in order]


def select_top(scores, count: int, *, min_per_layer: int = 0) -> np.ndarray:
    """Boolean [layers, kv_heads] with exactly `count` True: each layer's best `min_per_layer`, then the best."""
    s = _check_scores(scores)
    L, H = s.shape
    if not 0 <= min_per_layer <= H:
        raise BudgetError(f"min_per_layer must be in [0, {H}] (KV heads per layer), got {min_per_layer}")
    if not 0 <= count <= L * H:
        raise BudgetError(f"cannot keep {count} of {L * H} KV heads")
    if count < min_per_layer * L:
        raise BudgetError(
            f"a budget of {count} retrieval heads cannot give each of {L} layers {min_per_layer} "
            f"(needs at least {min_per_layer * L}); lower --min-per-layer or raise the budget"
        )
    table = np.zeros((L, H), dtype=bool)
    ranked = rank_heads(s)
    if min_per_layer:
        for li in range(L):
            for h in [h for (l2, h) in ranked if l2 == li][:min_per_layer]:
                table[li, h] = True
    for li, h in ranked:
        if table.sum() >= count:
            break
        table[li, h] = True
    assert int(table.sum()) == count
    return table


def select_budget(scores, budget: float, *, min_per_layer: int = 0) -> np.ndarray:
    """Keep round(budget * num_heads) KV heads (see select_top). budget: fraction in [0, 1]."""
    s = _check_scores(scores)
    return select_top(s, budget_heads(budget, s.size), min_per_layer=min_per_layer)


@dataclass
class Search:
    """Result of `smallest_passing`: the budget found (None: none passed) and every budget tried."""

    budget: float | None
    result: object  # what check() returned for the budget found
    trace: list[tuple[float, bool, object]] = field(default_factory=list)  # (budget, passed, result), in order


def smallest_passing(budgets: Sequence[float], check: Callable[[float], tuple[bool, object]]) -> Search:
    """The smallest budget b in `budgets` with check(b) passing, by bisection (passing is assumed
    to grow with the budget). check(b) -> (passed, result). The middle budget is checked first,
    then, only when it fails, the largest: when that fails too, no other is tried and
    Search.budget is None. A search that passes in the lower half so never pays for the largest
    (each check is a measurement: the most expensive step of a compile)."""
    grid = sorted({float(b) for b in budgets})
    if not grid:
        raise BudgetError("no budget to search")
    seen: dict[float, tuple[bool, object]] = {}
    trace: list[tuple[float, bool, object]] = []

    def ok(i: int) -> bool:
        b = grid[i]
        if b not in seen:
            seen[b] = check(b)
            trace.append((b, *seen[b]))
        return seen[b][0]

    lo, hi = 0, len(grid) - 1
    mid = hi // 2
    if ok(mid):
        hi = mid
    elif not ok(hi):
        return Search(None, seen[grid[hi]][1], trace)
    else:
        lo = mid + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return Search(grid[lo], seen[grid[lo]][1], trace)


# ---- byte budgets with per-head options ---------------------------------------------------------
MAX_DP_CELLS = 50_000_000  # heads x options x budget units; beyond it costs are coarsened (never over budget)


def allocate(losses, costs, budget: int, allowed=None) -> np.ndarray:
    """Choose one option per head: minimise the summed loss with the summed cost within `budget`.

    losses, costs: [heads, options] (costs are non-negative integers, e.g. cached tokens at the
    reference context; losses any finite numbers, lower is better); `allowed`, optional bool
    [heads, options], rules options out. Returns int [heads], the chosen option of each head.
    Raises BudgetError when even the cheapest allowed options exceed the budget.

    A multiple-choice knapsack, solved exactly by dynamic programming over the cost: every cost
    is a multiple of the greatest common divisor of all costs (64 tokens for the default option
    ladder), so the table has heads x options x budget/unit cells, a few million at most for a
    model's KV heads. Exact beats the usual greedy on the convex hull here because options are
    few and a head's loss is not convex in its bytes (a window either covers a needle or not).
    Ties go to the costlier option: a budget is an allowance, and bytes where the losses see no
    difference are margin against what they do not see.
    """
    loss = np.asarray(losses, dtype=np.float64)
    cost = np.asarray(costs)
    if loss.shape != cost.shape or loss.ndim != 2 or loss.size == 0:
        raise BudgetError(f"losses and costs must be equal [heads, options] arrays, got {loss.shape}, {cost.shape}")
    if not np.isfinite(loss).all():
        raise BudgetError("option losses contain NaN or infinite values")
    if (cost < 0).any() or not np.array_equal(cost, np.round(cost)):
        raise BudgetError("option costs must be non-negative integers")
    cost = cost.astype(np.int64)
    ok = np.ones(loss.shape, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if ok.shape != loss.shape or not ok.any(axis=1).all():
        raise BudgetError("`allowed` must be a [heads, options] mask leaving every head an option")
    floor = int(np.where(ok, cost, np.iinfo(np.int64).max).min(axis=1).sum())
    if budget < floor:
        raise BudgetError(f"a budget of {budget} cannot hold even the cheapest option of every head ({floor})")
    unit = int(np.gcd.reduce(cost[cost > 0])) if (cost > 0).any() else 1
    cells = loss.size * (budget // unit + 1)
    if cells > MAX_DP_CELLS:  # coarsen: round costs up, so the choice still fits the budget
        unit = int(unit * np.ceil(cells / MAX_DP_CELLS))
    units = -(-cost // unit)  # ceil
    cap = budget // unit
    H, n_opts = loss.shape
    # best[b] = least loss of the heads so far with total cost <= b units; ties go to the costlier
    # option: where the losses cannot tell options apart, the budget buys safety margin
    tie = -1e-12 * units / max(cap, 1)
    best = np.zeros(cap + 1)
    picks = np.zeros((H, cap + 1), dtype=np.int64)
    for h in range(H):
        cand = np.full((n_opts, cap + 1), np.inf)
        for o in range(n_opts):
            c = units[h, o]
            if c <= cap and ok[h, o]:
                cand[o, c:] = best[: cap + 1 - c] + loss[h, o] + tie[h, o]
        picks[h] = cand.argmin(axis=0)
        best = cand.min(axis=0)
    choice = np.zeros(H, dtype=np.int64)
    b = cap
    for h in range(H - 1, -1, -1):
        choice[h] = picks[h, b]
        b -= units[h, choice[h]]
    assert int(cost[np.arange(H), choice].sum()) <= budget
    return choice
