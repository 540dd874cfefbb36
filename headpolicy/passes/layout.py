"""The fixed-shape split-cache layout of exported graphs (batch rows share positions: no padding).

Per layer, in the permuted head order:
    retrieval part   [B, R, T, D]          every token, grows by one per decode step
    streaming group  [B, Hg, sink + window, D]
        slot i < sink       holds token i
        slot sink + j       ring: the newest token p >= sink with (p - sink) % window == j

Nothing but the number of tokens seen is needed to know which token sits in which slot,
so decode graphs take the step index (the new token's position n) and derive the rest.
These helpers are plain functions that the passes insert as graph nodes; `torch.export`
traces through them when the rewritten graph is exported again.
"""

from __future__ import annotations

import torch

from headpolicy.policies.rule import ring_slot


def positions(x: torch.Tensor) -> torch.Tensor:
    """Positions 0..T-1 of the T tokens along dim 2 of x: [B, H, T, D] -> int64 [T]."""
    return torch.arange(x.shape[2], device=x.device)


def step_position(position_ids: torch.Tensor) -> torch.Tensor:
    """The decode step's token position n: position_ids [1, 1] -> int64 [1]."""
    return position_ids.reshape(-1)[:1].to(torch.int64)


def slot_positions(count: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Token position held by each of the sink + window slots after `count` tokens; -1 = empty.

    count: int64 [1]. Returns int64 [sink + window].
    """
    last = count - 1
    i = torch.arange(sink, device=count.device)
    sink_pos = torch.where(i <= last, i, torch.full_like(i, -1))
    j = torch.arange(window, device=count.device)
    first = sink + j  # the first token that lands in ring slot j
    laps = torch.div((last - first).clamp(min=0), window, rounding_mode="floor")
    ring_pos = torch.where(first <= last, first + laps * window, torch.full_like(j, -1))
    return torch.cat([sink_pos, ring_pos])


def ring_fill(k: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Streaming part after a prefill of the T tokens in k: [B, H, T, D] -> [B, H, sink + window, D].

    Empty slots hold an arbitrary token: their position is -1, so no query sees them.
    """
    count = positions(k)[-1:] + 1
    index = slot_positions(count, sink, window).clamp(min=0)
    return k.index_select(2, index)


def ring_write(past: torch.Tensor, new: torch.Tensor, n: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Write the token at position n into its slot. past: [B, H, C, D], new: [B, H, 1, D], n: [1]."""
    slot = ring_slot(n, sink, window)
    hit = torch.arange(past.shape[2], device=past.device) == slot  # [C]
    return torch.where(hit[None, None, :, None], new, past)


def append(past: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Retrieval part: [B, R, T, D] + [B, R, 1, D] -> [B, R, T + 1, D]."""
    return torch.cat([past, new], dim=2)


def expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """Repeat each KV head for its query group: [B, H, T, D] -> [B, H * group, T, D]."""
    B, H, T, D = x.shape
    return x[:, :, None].expand(B, H, group, T, D).reshape(B, H * group, T, D)
