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
    """`num_retrieval` KV heads drawn uniformly at random (seeded) keep the full cache.

    Drawn among the heads a policy chooses (ModelInfo.policy_layers): a hybrid model's own
    sliding-window layers stay as they are, so the baseline gets as many chosen heads as the policy.
    """
    layers = info.policy_layers
    n = len(layers) * info.num_kv_heads
    if not 0 <= num_retrieval <= n:
        raise ValueError(f"num_retrieval must be in [0, {n}] (KV heads in full-attention layers), got {num_retrieval}")
    pick = np.random.default_rng(seed).choice(n, size=num_retrieval, replace=False)
    chosen = np.zeros(n, dtype=bool)
    chosen[pick] = True
    table = np.zeros((info.num_layers, info.num_kv_heads), dtype=bool)
    table[layers] = chosen.reshape(len(layers), info.num_kv_heads)
    return HeadPolicy.from_kinds(
        info, table.tolist(), sink=sink, window=window,
        provenance=Provenance(method="random", version="baseline", seed=seed),
    )  # fmt: skip
