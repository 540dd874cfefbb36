"""Each scorer must rank a hand-planted head first (see planted.py)."""

import numpy as np
import pytest
import torch

from headpolicy.profiler import tasks as T
from headpolicy.profiler.probes import Probe, attention_rows, capturing, reduce_to_kv
from headpolicy.profiler.scorers import get_scorer, scorer_names
from tests.profiler.planted import planted_model

CODEC = T.CharCodec(97)
PLANT = (1, 1)


def _needle_tasks():
    return [T.passkey(CODEC, 700, 0.5, seed=0)]


def _assert_planted_first(scores):
    assert scores.shape == (2, 2)
    order = np.argsort(-scores.reshape(-1), kind="stable")
    assert np.unravel_index(order[0], scores.shape) == PLANT, scores
    assert scores[PLANT] > 2 * np.delete(scores.reshape(-1), order[0]).max() + 1e-6, scores


def test_registry():
    assert {"retrieval", "attention_mass", "echo_induction"} <= set(scorer_names())
    with pytest.raises(KeyError, match="unknown scorer"):
        get_scorer("nope")


def test_retrieval_ranks_copy_head_first():
    (task,) = _needle_tasks()
    offset = task.prompt_len - 1 - task.needle[0]  # answer step t looks back to needle[0] + t
    model = planted_model(layer=PLANT[0], head=PLANT[1], offset=offset)
    scores = get_scorer("retrieval")(model, [task], sink=4, window=16)
    _assert_planted_first(scores)
    assert scores[PLANT] == pytest.approx(1.0, abs=2e-3)  # copies at every answer step


def test_attention_mass_ranks_far_head_first():
    model = planted_model(layer=PLANT[0], head=PLANT[1], offset=300)
    scores = get_scorer("attention_mass")(model, _needle_tasks(), sink=4, window=16)
    _assert_planted_first(scores)


def test_echo_induction_ranks_induction_head_first():
    task = T.repeated_tokens(97, 601, seed=0, prefix=[1])
    n = task.needle[1] - task.needle[0]
    model = planted_model(layer=PLANT[0], head=PLANT[1], offset=n - 1)  # r[i] -> token after its earlier copy
    scores = get_scorer("echo_induction")(model, [task], sink=4, window=16)
    _assert_planted_first(scores)
    assert scores[PLANT] > 0.95


def test_scorer_ignores_tasks_it_cannot_use():
    model = planted_model(layer=0, head=0, offset=5)
    with pytest.raises(ValueError, match="needs tasks of kind"):
        get_scorer("echo_induction")(model, _needle_tasks(), sink=4, window=16)


def test_capture_rows_match_dense_softmax_and_output_is_unchanged():
    model = planted_model(layer=0, head=1, offset=7)
    ids = torch.randint(3, 97, (1, 300))
    rows_seen = {}

    class Keep(Probe):
        def rows(self, layer, seq_len):
            return torch.tensor([0, 5, 150, 299])

        def consume(self, layer, rows, probs):
            rows_seen[layer] = probs

    with torch.no_grad():
        ref = model(ids).logits
        with capturing(model, Keep()):
            got = model(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    p = rows_seen[0]
    assert p.shape == (1, 6, 4, 300)
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 6, 4))
    assert float(p[0, :, 0, 1:].abs().max()) == 0.0  # causal: row 0 sees only key 0
    assert model.config._attn_implementation == "sdpa"  # restored


def test_attention_rows_gqa_reference():
    q, k = torch.randn(2, 6, 10, 8), torch.randn(2, 3, 10, 8)
    rows = torch.tensor([3, 9])
    got = attention_rows(q, k, rows, 0.5)
    kk = k.repeat_interleave(2, dim=1)
    s = (q @ kk.transpose(-1, -2)) * 0.5
    s = s.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    torch.testing.assert_close(got, s[:, :, rows])


def test_reduce_to_kv_takes_max_over_query_group():
    x = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.0, 0.4]])
    torch.testing.assert_close(reduce_to_kv(x, 2), torch.tensor([[0.9, 0.4]]))
    torch.testing.assert_close(reduce_to_kv(x, 2, "mean"), torch.tensor([[0.4, 0.7 / 3]]))
