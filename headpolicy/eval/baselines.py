"""Baseline policies for comparison at the same sink/window: all-streaming and random heads."""

from __future__ import annotations

import numpy as np

from headpolicy.policies.schema import HeadPolicy, ModelInfo, Provenance


def streaming_policy(info: ModelInfo, *, sink: int, window: int) -> HeadPolicy:
    """StreamingLLM: every KV head keeps only sink + window tokens."""
    table = [[False] * info.num_kv_heads for _ in range(info.num_layers)]
    return HeadPolicy.from_kinds(
        info, table, sink=sink, window=window, provenance=Provenance(method="streaming", version="baseline")
    )


def random_policy(info: ModelInfo, num_retrieval: int, *, seed: int, sink: int, window: int) -> HeadPolicy:
    """`num_retrieval` KV heads drawn uniformly at random (seeded) keep the full cache."""
    n = info.num_layers * info.num_kv_heads
    if not 0 <= num_retrieval <= n:
        raise ValueError(f"num_retrieval must be in [0, {n}], got {num_retrieval}")
    pick = np.random.default_rng(seed).choice(n, size=num_retrieval, replace=False)
    flat = np.zeros(n, dtype=bool)
    flat[pick] = True
    table = flat.reshape(info.num_layers, info.num_kv_heads).tolist()
    return HeadPolicy.from_kinds(
        info, table, sink=sink, window=window, provenance=Provenance(method="random", version="baseline", seed=seed)
    )
