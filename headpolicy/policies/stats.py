"""Rank statistics, once: ranks with ties averaged (scipy's "average") and Spearman's rho."""

from __future__ import annotations

import numpy as np


def rankdata(x) -> np.ndarray:
    """Ranks 1..n of the flattened `x`, lowest first; ties share the mean of their ranks."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=ranks) / counts)[inv]


def spearman(a, b) -> float:
    """Spearman rank correlation of two equal-size samples (ties averaged); NaN when one is constant."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs samples of equal size, got {a.size} and {b.size}")
    if a.size < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")
