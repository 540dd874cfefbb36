"""Our generate loop: the same tokens as transformers' generate, early stopping, bad prompts."""

import pytest
import torch

from headpolicy import PromptError, apply
from headpolicy.profiler import tasks as T
from headpolicy.runtime import generate as G
from tests.conftest import policy_for, tiny_llama

CODEC = T.CharCodec(97)


@pytest.fixture
def scripted(monkeypatch):
    """answer() is correct for task i iff script[i]; records which tasks ran."""
    ran: list[int] = []

    def fake(model, decode, task, **kw):
        ran.append(task.seed)
        return G.Outcome(task, SCRIPT[task.seed], "", 0)

    SCRIPT: dict[int, bool] = {}
    monkeypatch.setattr(G, "answer", fake)
    return SCRIPT, ran


def _tasks(n):
    return [T.passkey(CODEC, 300, 0.5, seed=i) for i in range(n)]


def test_answers_stop_after_the_allowed_misses(scripted):
    script, ran = scripted
    script.update({0: True, 1: False, 2: True, 3: False, 4: True, 5: True})
    outs = G.answers(None, CODEC.decode, _tasks(6), max_misses=1)
    assert ran == [0, 1, 2, 3] and len(outs) == 4  # the second miss ends the run
    ran.clear()
    assert len(G.answers(None, CODEC.decode, _tasks(6))) == 6 and ran == list(range(6))


@pytest.mark.parametrize("padded", [False, True])
def test_same_tokens_as_transformers_generate(padded):
    """Full model and applied model, left-padded batch: our loop == transformers' greedy generate."""
    model = tiny_llama(layers=2, seed=3)
    ids = torch.randint(3, 97, (2, 21), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
        ids[1, :5] = 0
    ours = G.generate(model, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                            eos_token_id=None, min_new_tokens=12)  # fmt: skip
    assert torch.equal(ours.tokens, theirs[:, ids.shape[1] :])

    policy = policy_for(model, [[True, False], [False, True]], sink=2, window=5)
    applied = apply(tiny_llama(layers=2, seed=3), policy)
    ours = G.generate(applied, ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    theirs = applied.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                              eos_token_id=None, min_new_tokens=12)  # fmt: skip
    assert torch.equal(ours.tokens, theirs[:, ids.shape[1] :])
    # reserved for prompt + 11 fed tokens up front: nothing spare, nothing grown
    assert ours.cache.kv_bytes() == ours.cache.kv_bytes_used() == policy.kv_bytes(21 + 11, batch=2)


def test_a_row_stops_at_eos_and_is_padded_after_it():
    model = tiny_llama(layers=1, seed=1)
    ids = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    free = G.generate(model, ids, max_new_tokens=6, eos_token_id=[])
    eos = int(free.tokens[0, 2])
    stopped = G.generate(model, ids, max_new_tokens=6, eos_token_id=eos)
    first = free.tokens[0].tolist().index(eos)
    assert stopped.tokens[0].tolist() == free.tokens[0, : first + 1].tolist()


def test_bad_prompts_are_named_errors():
    model = tiny_llama(layers=1)
    with pytest.raises(PromptError, match="empty"):
        G.generate(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    too_long = torch.ones(1, model.config.max_position_embeddings, dtype=torch.long)
    with pytest.raises(PromptError, match="at most 4096 tokens"):
        G.generate(model, too_long, max_new_tokens=1)
