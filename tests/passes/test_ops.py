"""The headpolicy ops and the cache layout against the plain reference."""

import pytest
import torch

from headpolicy.passes import layout
from headpolicy.passes.graph_ops import retrieval_attention, streaming_attention
from headpolicy.policies.rule import reference_attention


@pytest.mark.parametrize("S, sink, window", [(7, 2, 3), (300, 4, 50), (513, 0, 1), (260, 300, 7)])
def test_prefill_ops_match_reference(S, sink, window):
    torch.manual_seed(S)
    q, k, v = torch.randn(2, 6, S, 8), torch.randn(2, 2, S, 8), torch.randn(2, 2, S, 8)
    pos = torch.arange(S)
    got = torch.cat(
        [
            retrieval_attention(q[:, :3], k[:, :1], v[:, :1], pos, pos, 0.3),
            streaming_attention(q[:, 3:], k[:, 1:], v[:, 1:], pos, pos, sink, window, 0.3),
        ],
        dim=1,
    )
    want = reference_attention(
        q,
        k,
        v,
        retrieval=torch.tensor([True, False]),
        sink=torch.tensor([0, sink]),
        window=torch.tensor([1, window]),
        scale=0.3,
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sink, window", [(2, 3), (0, 4), (5, 1)])
def test_ring_layout_holds_sink_and_last_window(sink, window):
    """After every step the slots hold exactly tokens {< sink} and the last `window` others."""
    D, steps = 4, 3 * (sink + window) + 2
    tokens = torch.randn(1, 1, steps, D)
    cache = layout.ring_fill(tokens[:, :, :2], sink, window)
    for n in range(2, steps):
        cache = layout.ring_write(cache, tokens[:, :, n : n + 1], torch.tensor([n]), sink, window)
        pos = layout.slot_positions(torch.tensor([n + 1]), sink, window)
        held = sorted(p for p in pos.tolist() if p >= 0)
        assert held == sorted(set(range(min(sink, n + 1))) | set(range(max(sink, n + 1 - window), n + 1)))
        for slot, p in enumerate(pos.tolist()):
            if p >= 0:
                torch.testing.assert_close(cache[0, 0, slot], tokens[0, 0, p])
