"""The `gates` scorer: gated attention against the reference, a planted copying head, determinism."""

import numpy as np
import pytest
import torch

from headpolicy.policies.select import rank_heads
from headpolicy.profiler import tasks as T
from headpolicy.profiler.scorers import get_scorer
from headpolicy.profiler.scorers.gates import (
    GateSettings,
    gated,
    gated_attention,
    scaled_window,
    spearman,
    train_gates,
)
from headpolicy.runtime.reference import reference_attention
from tests.conftest import tiny_llama

DIGITS = [ord(c) for c in "0123456789"]
FAST = GateSettings(max_steps=16, min_steps=6, check_every=2, patience=2, lr=0.2)


@torch.no_grad()
def plant_copying_head(model, codec, *, layer=0, kv_head=1, strength=4.0):
    """Make KV head `kv_head` of `layer` attend to every digit token, wherever it is, and copy it out loud.

    Embedding dim -1 flags digit tokens, dim -2 is 1 for every token. Through the lowest
    RoPE frequency (nearly position-free), the head's queries read dim -2 and its keys dim -1,
    so its attention goes to the digits of the keys in the haystack; large V/O weights make
    its output dominate the residual stream. A streaming version of it loses far digits.
    """
    emb = model.get_input_embeddings().weight  # [V, hidden]
    attn = model.model.layers[layer].self_attn
    D = model.config.head_dim
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    digit_ids = [i for c in "0123456789" for i in codec.encode(c)]
    emb[:, -1] = 0.0
    emb[digit_ids, -1] = 1.0
    emb[:, -2] = 1.0
    lo = D // 2 - 1  # the lowest-frequency RoPE pair is (lo, D - 1)
    for qh in range(kv_head * G, (kv_head + 1) * G):
        attn.q_proj.weight[qh * D : (qh + 1) * D] = 0.0
        attn.q_proj.weight[qh * D + lo, -2] = strength
    attn.k_proj.weight[kv_head * D : (kv_head + 1) * D] = 0.0
    attn.k_proj.weight[kv_head * D + lo, -1] = strength
    attn.v_proj.weight[kv_head * D : (kv_head + 1) * D] *= 20.0
    attn.o_proj.weight[:, kv_head * G * D : (kv_head + 1) * G * D] *= 20.0
    return model


def needle_tasks(codec, n=3, length=384):
    return [T.multikey(codec, length, d, seed=i) for i, d in enumerate(np.linspace(0.1, 0.6, n))]


def planted_model(kv_head=1):
    model = tiny_llama(layers=2, heads=6, kv_heads=2, seed=0)
    codec = T.CharCodec(model.config.vocab_size)
    return plant_copying_head(model, codec, kv_head=kv_head), codec


@pytest.fixture(scope="module")
def planted():
    return planted_model()


@pytest.mark.parametrize("kv_head", [0, 1])
def test_planted_copying_head_ranks_first(kv_head):
    model, codec = planted_model(kv_head)
    run = train_gates(model, needle_tasks(codec), sink=4, window=16, settings=FAST)
    assert rank_heads(run.scores)[0] == (0, kv_head), run.scores
    assert run.gates[0, kv_head] > 0.5 and (np.delete(run.gates.reshape(-1), kv_head) < 0.5).all()


def test_deterministic(planted):
    model, codec = planted
    tasks = needle_tasks(codec, n=1)
    s = GateSettings(max_steps=3, min_steps=100, check_every=1)
    a = train_gates(model, tasks, sink=4, window=16, settings=s)
    b = train_gates(model, tasks, sink=4, window=16, settings=s)
    assert np.array_equal(a.scores, b.scores) and a.losses == b.losses


def test_registered_scorer_shows_loss_and_open_gates(planted):
    model, codec = planted

    class Bar:
        def __init__(self):
            self.n, self.total, self.postfix = 0, None, {}

        def reset(self, total):
            self.total = total

        def update(self, k):
            self.n += k

        def set_postfix(self, **kw):
            self.postfix = kw

    bar = Bar()
    tasks = needle_tasks(codec, n=1) + [T.repeated_tokens(97, 64, 0)]
    scores = get_scorer("gates").fn(model, tasks, sink=4, window=16, progress=bar, settings=GateSettings(max_steps=2))
    assert scores.shape == (2, 2) and np.isfinite(scores).all()
    assert bar.n >= 1 and bar.total is not None
    assert set(bar.postfix) == {"loss", "open"} and bar.postfix["open"].endswith("/4")


def test_model_left_as_found(planted):
    model, codec = planted
    before = model.config._attn_implementation
    flags = [p.requires_grad for p in model.parameters()]
    train_gates(model, needle_tasks(codec, n=1), sink=4, window=16, settings=GateSettings(max_steps=2))
    assert model.config._attn_implementation == before
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("S", [37, 64])
def test_gated_attention_mixes_reference_full_and_streaming(S):
    """g * full + (1 - g) * streaming, per KV head broadcast to its query group (odd length, GQA, batch 2)."""
    torch.manual_seed(0)
    B, Hq, Hkv, D, sink, window = 2, 6, 2, 8, 3, 5
    q, k, v = (torch.randn(B, h, S, D) for h in (Hq, Hkv, Hkv))
    model = tiny_llama(layers=1, heads=Hq, kv_heads=Hkv, head_dim=D, hidden=24)
    module = model.model.layers[0].self_attn
    gates = torch.tensor([[0.3, 0.9]])
    with gated(model, gates, sink, window):
        out, _ = gated_attention(module, q, k, v, None)
    ref = lambda keep: reference_attention(
        q,
        k,
        v,
        retrieval=torch.tensor([keep] * Hkv),
        sink=torch.tensor([sink] * Hkv),
        window=torch.tensor([window] * Hkv),
    )
    g = gates[0].repeat_interleave(Hq // Hkv)[None, :, None, None]
    want = g * ref(True) + (1 - g) * ref(False)
    torch.testing.assert_close(out.transpose(1, 2), want, atol=1e-5, rtol=1e-5)


def test_all_gates_open_is_the_full_model(planted):
    model, codec = planted
    ids = needle_tasks(codec, n=1)[0].tensor()
    with torch.no_grad():
        full = model(ids).logits
        with gated(model, torch.ones(2, 2), 4, 16):
            open_ = model(ids).logits
    assert (full - open_).abs().max() <= 1e-4


def test_gates_need_answered_needle_tasks(planted):
    model, _ = planted
    with pytest.raises(ValueError, match="passkey/multikey"):
        train_gates(model, [T.repeated_tokens(97, 64, 0)], sink=4, window=16)


def test_scaled_window_and_spearman():
    assert scaled_window(64, 256, 4096) == (64, 256)
    s, w = scaled_window(64, 256, 1024)
    assert s + w <= 1024 // 8 and s / w == pytest.approx(0.25, rel=0.1)
    assert spearman(np.arange(5), np.arange(5) * 3) == pytest.approx(1.0)
    assert spearman(np.arange(5), -np.arange(5)) == pytest.approx(-1.0)
