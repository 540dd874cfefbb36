"""Combined scorers (`ensemble`: several scorers combined by rank; `hybrid`), and how much scorers agree.

Scorers measure different things on different scales (a copy rate, an attention share, a
gate), so they are combined by rank, never by value. The rule (`fuse`, default "rrf",
reciprocal rank fusion):

    rank_s(h)  = 1 for scorer s's best KV head, ties share their mean rank
    fused(h)   = mean over scorers s of  1 / (k + rank_s(h)),   k = max(1, round(RRF_SHARE * N))

with N the number of KV heads. A small k (5% of the heads) lets a head near the top of any
one scorer outrank a head that is middling everywhere: a KV head must keep its cache if
any criterion says it reads the far context (the same reason query heads are reduced to
their KV head with a max), while agreement between scorers still adds up. "borda" (mean
rank, all positions weighted alike) is the alternative.

`agreement(scores)` reports, for every pair of scorers, the Spearman rank correlation over
all heads and, per budget, the overlap of the sets `select_budget` keeps (|A & B| / |A|).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

import numpy as np

from headpolicy.policies.select import select_budget
from headpolicy.policies.stats import rankdata, spearman

from . import register_combination

MEMBERS = ("retrieval", "attention_mass", "echo_induction")  # the training-free scorers
HYBRID = ("retrieval", "attention_mass")
RULES = ("rrf", "borda")
RRF_SHARE = 0.05
AGREEMENT_BUDGETS = (0.1, 0.2, 0.33, 0.5)


def ranks_best_first(scores: np.ndarray) -> np.ndarray:
    """Rank of every head, 1 = highest score, ties share their mean rank. Same shape as `scores`."""
    s = np.asarray(scores, dtype=np.float64)
    return (s.size + 1 - rankdata(s)).reshape(s.shape)  # rankdata: 1 = lowest


def fuse(scores: Mapping[str, np.ndarray], rule: str = "rrf") -> np.ndarray:
    """Combine {name: [L, Hkv]} scores by rank (module docstring). Returns float32 [L, Hkv], higher = keep."""
    if not scores:
        raise ValueError("fuse needs at least one scorer's scores")
    shapes = {np.shape(v) for v in scores.values()}
    if len(shapes) != 1:
        raise ValueError(f"scores to fuse have different shapes: {sorted(shapes)}")
    ranks = np.stack([ranks_best_first(v) for v in scores.values()])  # [M, L, Hkv]
    n = ranks[0].size
    if rule == "rrf":
        k = max(1, round(RRF_SHARE * n))
        return (1.0 / (k + ranks)).mean(axis=0).astype(np.float32)
    if rule == "borda":
        return (1.0 - (ranks - 1) / max(n - 1, 1)).mean(axis=0).astype(np.float32)
    raise ValueError(f"unknown fusion rule {rule!r} (known: {', '.join(RULES)})")


@register_combination("ensemble", members=MEMBERS)
def ensemble(maps: Mapping[str, np.ndarray]) -> np.ndarray:
    """Rank fusion (RRF) of the training-free scorers (retrieval, attention_mass, echo_induction)."""
    return fuse(maps, "rrf")


@register_combination("hybrid", members=HYBRID)
def hybrid(maps: Mapping[str, np.ndarray]) -> np.ndarray:
    """Mean of the max-normalised retrieval and attention_mass maps (each in [0, 1] before averaging)."""
    parts = [v / v.max() if v.max() > 0 else v for v in maps.values()]
    return np.mean(parts, axis=0)


def overlap(a: np.ndarray, b: np.ndarray, budget: float) -> float:
    """|A & B| / |A| for the head sets select_budget keeps from scores a and b at `budget`."""
    ta, tb = select_budget(a, budget), select_budget(b, budget)
    k = int(ta.sum())
    return float((ta & tb).sum() / k) if k else 1.0


def agreement(scores: Mapping[str, np.ndarray], budgets: Sequence[float] = AGREEMENT_BUDGETS) -> dict:
    """Pairwise agreement of scorers: {"pairs": [{"a", "b", "spearman", "overlap": {budget: share}}]}."""
    pairs = []
    for (na, a), (nb, b) in combinations(scores.items(), 2):
        pairs.append({
            "a": na,
            "b": nb,
            "spearman": round(spearman(a, b), 4),
            "overlap": {f"{x:g}": round(overlap(a, b, x), 4) for x in budgets},
        })  # fmt: skip
    return {"budgets": [float(x) for x in budgets], "pairs": pairs}


def format_agreement(result: dict) -> str:
    """A table: one row per scorer pair, Spearman rho and set overlap per budget."""
    budgets = [f"{b:g}" for b in result["budgets"]]
    pairs = result["pairs"]
    width = max([len(f"{p['a']} / {p['b']}") for p in pairs] + [5])
    head = f"{'pair':<{width}}  {'rho':>6}  " + "  ".join(f"{'@' + b:>6}" for b in budgets)
    lines = ["scorer agreement (Spearman rho; overlap of the kept heads at each budget)", head, "-" * len(head)]
    for p in pairs:
        cells = "  ".join(f"{p['overlap'][b]:>6.2f}" for b in budgets)
        lines.append(f"{p['a'] + ' / ' + p['b']:<{width}}  {p['spearman']:>6.3f}  {cells}")
    return "\n".join(lines)
