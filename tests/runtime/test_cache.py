"""Storage of the split cache: buffers grow in blocks, keep their tokens, and never exceed their bound."""

import torch

from headpolicy.runtime.cache import GROW_MIN, GROW_SHARE, StreamBuffer, TokenBuffer, grown_capacity
from tests.conftest import make_plan


def test_appending_token_by_token_copies_amortised_constant_per_token():
    n = 6000
    x = torch.randn(2, 3, n, 4)
    buf = TokenBuffer(2, 3, 4, torch.float32, "cpu")
    copied = grows = 0
    for t in range(n):
        capacity, storage = buf.capacity, buf.allocated[0].data_ptr()
        buf.append(x[:, :, t : t + 1], -x[:, :, t : t + 1])
        if buf.capacity == capacity:  # written into spare capacity: same storage, nothing copied
            assert buf.allocated[0].data_ptr() == storage
        else:
            copied, grows = copied + t, grows + 1
    assert copied <= GROW_SHARE * n and grows <= 30  # 23 reallocations for 6000 tokens, not one per token
    assert n <= buf.capacity <= n + max(GROW_MIN, n // GROW_SHARE)
    assert torch.equal(buf.k, x) and torch.equal(buf.v, -x)
    assert buf.used_nbytes == 2 * x.nbytes and buf.nbytes == 2 * x.nbytes * buf.capacity // n


def test_reserve_allocates_exactly_and_growth_respects_the_limit():
    buf = TokenBuffer(1, 2, 8, torch.float32, "cpu")
    buf.reserve_exactly(37)
    buf.append(torch.ones(1, 2, 37, 8), torch.ones(1, 2, 37, 8))
    assert buf.capacity == 37 and buf.nbytes == buf.used_nbytes
    assert grown_capacity(38, 37) == 37 + GROW_MIN and grown_capacity(38, 37, limit=40) == 40
    assert grown_capacity(5000, 4800) == 4800 + 4800 // GROW_SHARE


def test_stream_buffer_wraps_its_ring_within_sink_plus_window():
    (group,) = make_plan(0, [(2, 3, 5)], 1).groups
    buf = StreamBuffer(group, 1, 4, torch.float32, "cpu")
    k = torch.arange(30.0)[None, None, :, None].expand(1, 2, 30, 4)
    buf.commit_run(k[:, :, :4], k[:, :, :4], 0)  # a prefill of 4, then one token at a time
    for t in range(4, 30):
        buf.commit_run(k[:, :, t : t + 1], k[:, :, t : t + 1], t)
        assert buf.size == min(t + 1, 8) and buf.kv.capacity == 8  # grown once, to its bound
        # sink ranks 0..2, then the last 5 in ring slots; every slot holds the token of its rank
        assert sorted(buf.rank[0].tolist()) == list(range(3)) + list(range(max(3, t - 4), t + 1))
        assert torch.equal(buf.k[0, 0, :, 0], buf.rank[0].float())
