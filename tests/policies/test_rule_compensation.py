"""The compensation token's rule (policies/rule.py) against its definition, query by query."""

import math

import pytest
import torch

from headpolicy.policies.rule import dropped_count, reference_attention, token_ranks


def by_definition(q, k, v, retrieval, sink, window, compensate, key_valid, scale):
    """Loops over rows, heads and queries: the keys each query sees plus, on a compensated
    streaming head, one key/value = the mean over D_i = {sink <= j <= i - window} with logit + log|D_i|."""
    B, Hq, S, D = q.shape
    H, T = k.shape[1], k.shape[2]
    G = Hq // H
    ranks = token_ranks(key_valid, B, T)
    out = torch.zeros(B, Hq, S, D, dtype=torch.float64)
    for b in range(B):
        for hq in range(Hq):
            h = hq // G
            for s in range(S):
                i = int(ranks[b, T - S + s])
                if i < 0:
                    continue
                logits, values, dropped = [], [], []
                for t in range(T):
                    j = int(ranks[b, t])
                    if j < 0 or j > i:
                        continue
                    if retrieval[h] or j < sink[h] or i - j < window[h]:
                        logits.append(scale * float(q[b, hq, s].double() @ k[b, h, t].double()))
                        values.append(v[b, h, t].double())
                    else:
                        dropped.append(t)
                if compensate[h] and not retrieval[h] and dropped:
                    kc = k[b, h, dropped].double().mean(0)
                    logits.append(scale * float(q[b, hq, s].double() @ kc) + math.log(len(dropped)))
                    values.append(v[b, h, dropped].double().mean(0))
                    assert len(dropped) == dropped_count(i, sink[h], window[h])
                p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                out[b, hq, s] = sum(pi * vi for pi, vi in zip(p, values, strict=True))
    return out


@pytest.mark.parametrize("S", [1, 5, 19])
@pytest.mark.parametrize("padded", [False, True])
def test_reference_with_compensation_matches_the_definition(S, padded):
    g = torch.Generator().manual_seed(0)
    B, H, G, T, D = 2, 4, 2, 19, 4
    q = torch.randn(B, H * G, S, D, generator=g)
    k, v = torch.randn(B, H, T, D, generator=g), torch.randn(B, H, T, D, generator=g)
    retrieval = torch.tensor([True, False, False, False])
    sink, window = torch.tensor([0, 2, 0, 3]), torch.tensor([1, 5, 3, 4])
    compensate = torch.tensor([False, True, True, False])
    key_valid = None
    if padded:
        key_valid = torch.ones(B, T, dtype=torch.long)
        key_valid[1, :4] = 0
    out = reference_attention(q, k, v, retrieval=retrieval, sink=sink, window=window, key_valid=key_valid,
                              scale=0.6, compensate=compensate)  # fmt: skip
    want = by_definition(q, k, v, retrieval.tolist(), sink.tolist(), window.tolist(), compensate.tolist(),
                         key_valid, 0.6)  # fmt: skip
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_without_compensated_heads_the_reference_is_unchanged():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, 9, 4, generator=g), torch.randn(1, 2, 9, 4, generator=g), torch.randn(1, 2, 9, 4)
    table = dict(retrieval=torch.tensor([True, False]), sink=torch.tensor([0, 1]), window=torch.tensor([1, 2]))
    plain = reference_attention(q, k, v, **table)
    for comp in (None, torch.tensor([False, False]), torch.tensor([True, False])):  # retrieval heads never compensate
        assert torch.equal(reference_attention(q, k, v, **table, compensate=comp), plain)
    assert not torch.equal(reference_attention(q, k, v, **table, compensate=torch.tensor([False, True])), plain)


def test_dropped_count():
    assert [dropped_count(i, 2, 3) for i in (-1, 0, 4, 5, 9)] == [0, 0, 0, 1, 5]
    assert dropped_count(torch.tensor([-1, 4, 5, 9]), 2, 3).tolist() == [0, 0, 1, 5]
