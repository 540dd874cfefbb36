import pytest
import torch

from headpolicy.profiler import tasks as T
from tests.conftest import tiny_llama

CODEC = T.CharCodec(97)
POOL = list(range(40, 90)) * 3


@pytest.mark.parametrize("kind", ["passkey", "multikey"])
@pytest.mark.parametrize("pool", [None, POOL], ids=["repeat-filler", "sampled-filler"])
def test_needle_is_where_it_says(kind, pool):
    for depth in (0.0, 0.3, 0.7, 1.0):
        t = T.make_task(kind, CODEC, 900, depth, seed=3, pool=pool)
        a, b = t.needle
        assert len(t.input_ids) == t.length == 900
        assert t.input_ids[a:b] == t.answer_ids
        assert CODEC.decode(t.answer_ids).strip() == t.answer
        assert t.answer.isdigit() and len(t.answer) == 5
        assert t.filler == ("repeat" if pool is None else "sampled")


def test_needle_moves_with_depth():
    starts = [T.passkey(CODEC, 1200, d, seed=0).needle[0] for d in (0.1, 0.5, 0.9)]
    assert starts == sorted(starts) and starts[0] < starts[-1] - 500


@pytest.mark.parametrize("kind", ["passkey", "multikey", "repeat"])
def test_deterministic_per_seed(kind):
    a = T.make_task(kind, CODEC, 800, 0.4, seed=5, pool=POOL)
    assert a == T.make_task(kind, CODEC, 800, 0.4, seed=5, pool=POOL)
    assert a.input_ids != T.make_task(kind, CODEC, 800, 0.4, seed=6, pool=POOL).input_ids


def test_multikey_asks_one_of_several_keys():
    t = T.multikey(CODEC, 1000, 0.5, seed=1, n_keys=4)
    text = CODEC.decode(t.input_ids)
    assert text.count("The key for") == 4 + 1  # four lines and the question
    asked = text.rsplit("What is the key for ", 1)[1].split("?")[0]
    assert f"The key for {asked} is {t.answer}." in text


def test_repeated_tokens_repeat():
    t = T.repeated_tokens(97, 301, seed=2, prefix=[1])
    a, b = t.needle
    assert (a, b) == (1, 151) and len(t.input_ids) == 301
    assert t.input_ids[a:b] == t.input_ids[b : b + (b - a)]
    assert min(t.input_ids[1:]) >= 3


def test_too_short_is_an_error():
    with pytest.raises(ValueError, match="too short"):
        T.passkey(CODEC, 50, 0.5, seed=0)


def test_sampled_haystack_is_seeded_and_digit_free():
    model = tiny_llama(vocab=97)
    a = T.sample_haystack(model, CODEC, 40, seed=0, rows=2)
    assert a == T.sample_haystack(model, CODEC, 40, seed=0, rows=2)
    assert a != T.sample_haystack(model, CODEC, 40, seed=1, rows=2)
    assert not any(ch.isdigit() for ch in CODEC.decode(a))
    t = T.passkey(CODEC, 900, 0.5, seed=0, pool=a)
    assert t.input_ids[t.needle[0] : t.needle[1]] == t.answer_ids


def test_task_tensor_teacher_forcing():
    t = T.passkey(CODEC, 700, 0.5, seed=0)
    x = t.tensor(with_answer=True)
    assert x.shape == (1, 700 + len(t.answer_ids)) and x.dtype == torch.long


def test_sampled_haystack_pool_covers_the_request_in_rows():
    model = tiny_llama(vocab=97)
    pool = T.sample_haystack(model, CODEC, 300, seed=0)  # default rows: one per ROW_TOKENS tokens
    assert len(pool) >= 0.9 * 300  # eos and digit tokens are dropped
    assert CODEC.decode(pool).count("Once upon a time") == -(-300 // T.ROW_TOKENS)  # each row starts with it


def test_a_long_enough_pool_is_cut_not_tiled():
    import random

    rng = random.Random(0)
    pool = [rng.randrange(3, 97) for _ in range(2000)]
    for seed in range(5):
        got = T._filler_tokens(CODEC, 700, pool, random.Random(seed))
        starts = [s for s in range(len(pool) - 699) if pool[s : s + 700] == got]
        assert starts, "the filler is one contiguous window of the pool"
    short = T._filler_tokens(CODEC, 700, pool[:300], random.Random(0))
    assert len(short) == 700  # shorter pools are tiled
