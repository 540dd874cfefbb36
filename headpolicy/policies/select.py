"""From head scores to a retrieval/streaming table.

(a) `select_budget`: the top `round(budget * num_heads)` KV heads by score stay retrieval
    (after each layer's top `min_per_layer`). Ties go to the lower (layer, head), so the
    same scores always give the same table.
(b) `select_closed_loop`: the smallest budget on a grid whose accuracy, measured by a
    caller-supplied `evaluate(table) -> percent` (the real runtime on held-out tasks), is
    within `tolerance` points of the full model's. Budgets are searched by bisection,
    assuming accuracy grows with the budget; every evaluation is kept in the trace.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from headpolicy.errors import BudgetError
from headpolicy.policies.schema import finite_number

DEFAULT_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.75, 1.0)


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
class ClosedLoopResult:
    table: np.ndarray
    budget: float
    accuracy: float
    full_accuracy: float
    trace: list[dict] = field(default_factory=list)  # every candidate evaluated, in order


def select_closed_loop(
    scores,
    evaluate: Callable[[np.ndarray], float],
    *,
    full_accuracy: float,
    tolerance: float,
    budgets: Sequence[float] = DEFAULT_GRID,
    min_per_layer: int = 0,
) -> ClosedLoopResult:
    """Smallest budget in `budgets` with evaluate(table) >= full_accuracy - tolerance.

    Raises BudgetError when not even the largest budget meets the target.
    """
    s = _check_scores(scores)
    if tolerance < 0 or not math.isfinite(tolerance):
        raise BudgetError(f"the accuracy tolerance must be >= 0 points, got {tolerance}")
    grid = sorted({float(b) for b in budgets})
    for b in grid:
        budget_heads(b, s.size)  # validate
    grid = [b for b in grid if budget_heads(b, s.size) >= min_per_layer * s.shape[0]]
    if not grid:
        raise BudgetError(f"no budget in the grid leaves {min_per_layer} retrieval heads per layer")
    target = full_accuracy - tolerance
    trace: list[dict] = []
    cache: dict[float, tuple[np.ndarray, float]] = {}

    def ok(i: int) -> bool:
        b = grid[i]
        if b not in cache:
            table = select_budget(s, b, min_per_layer=min_per_layer)
            # every head retrieval reproduces the full model: no need to run it again
            run = not table.all()
            acc = float(evaluate(table)) if run else float(full_accuracy)
            cache[b] = (table, acc)
            trace.append({"budget": b, "retrieval_heads": int(table.sum()), "accuracy": acc,
                          "ok": acc >= target, "evaluated": run})  # fmt: skip
        return cache[grid[i]][1] >= target

    lo, hi = 0, len(grid) - 1
    if not ok(hi):
        raise BudgetError(
            f"no budget up to {grid[hi]:.2f} keeps held-out accuracy within {tolerance:g} points of the "
            f"full model's {full_accuracy:.1f}% (best: {cache[grid[hi]][1]:.1f}%); raise the budget or the tolerance"
        )
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    table, acc = cache[grid[lo]]
    return ClosedLoopResult(table, grid[lo], acc, full_accuracy, trace)
