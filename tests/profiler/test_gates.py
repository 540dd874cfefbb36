"""The `gates` scorer: gated attention against the reference, a planted copying head, determinism."""

import numpy as np
import pytest
import torch

from headpolicy.policies.rule import reference_attention
from headpolicy.policies.select import rank_heads
from headpolicy.policies.stats import spearman
from headpolicy.profiler import tasks as T
from headpolicy.profiler.scorers import get_scorer
from headpolicy.profiler.scorers.gates import (
    GateSettings,
    gated,
    gated_attention,
    scaled_window,
    train_gates,
)
from tests.conftest import tiny_llama
from tests.profiler.planted import planted_model

FAST = GateSettings(max_steps=16, min_steps=6, check_every=2, patience=2, lr=0.2)
CODEC = T.CharCodec(97)


def needle_tasks(n=2, length=700):
    return [T.passkey(CODEC, length, 0.5, seed=i) for i in range(n)]


def copy_head_model(layer, head, task):
    """planted.py's model with head (layer, head) looking back from each answer step to the token it copies."""
    return planted_model(layer=layer, head=head, offset=task.prompt_len - 1 - task.needle[0])


@pytest.fixture(scope="module")
def planted():
    return copy_head_model(1, 1, needle_tasks(1)[0])


@pytest.mark.parametrize("plant", [(1, 1), (0, 0)])
def test_planted_copying_head_ranks_first(plant):
    tasks = needle_tasks(2)  # same length and needle offset, different pass keys
    assert len({(t.prompt_len, t.needle) for t in tasks}) == 1
    model = copy_head_model(*plant, tasks[0])
    run = train_gates(model, tasks, sink=4, window=16, settings=FAST)
    assert rank_heads(run.scores)[0] == plant, run.scores
    others = np.delete(run.gates.reshape(-1), plant[0] * 2 + plant[1])
    assert run.gates[plant] > 0.5 and (others < 0.5).all(), run.gates


def test_deterministic(planted):
    model = planted
    tasks = needle_tasks(1)
    s = GateSettings(max_steps=3, min_steps=100, check_every=1)
    a = train_gates(model, tasks, sink=4, window=16, settings=s)
    b = train_gates(model, tasks, sink=4, window=16, settings=s)
    assert np.array_equal(a.scores, b.scores) and a.losses == b.losses


def test_registered_scorer_shows_loss_and_open_gates(planted):
    model = planted

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
    tasks = needle_tasks(1) + [T.repeated_tokens(97, 64, 0)]
    settings = GateSettings(max_steps=2)
    scores = get_scorer("gates").measure(model, tasks, sink=4, window=16, progress=bar, settings=settings)
    assert scores.shape == (2, 2) and np.isfinite(scores).all()
    assert bar.n >= 1 and bar.total is not None
    assert set(bar.postfix) == {"loss", "open"} and bar.postfix["open"].endswith("/4")


def test_model_left_as_found(planted):
    model = planted
    before = model.config._attn_implementation
    flags = [p.requires_grad for p in model.parameters()]
    train_gates(model, needle_tasks(1), sink=4, window=16, settings=GateSettings(max_steps=2))
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
    model = planted
    ids = needle_tasks(1)[0].tensor()
    with torch.no_grad():
        full = model(ids).logits
        with gated(model, torch.ones(2, 2), 4, 16):
            open_ = model(ids).logits
    assert (full - open_).abs().max() <= 1e-4


def test_gates_need_answered_needle_tasks(planted):
    model = planted
    with pytest.raises(ValueError, match="passkey/multikey"):
        train_gates(model, [T.repeated_tokens(97, 64, 0)], sink=4, window=16)


def test_scaled_window_and_spearman():
    assert scaled_window(64, 256, 4096) == (64, 256)
    s, w = scaled_window(64, 256, 1024)
    assert s + w <= 1024 // 8 and s / w == pytest.approx(0.25, rel=0.1)
    assert spearman(np.arange(5), np.arange(5) * 3) == pytest.approx(1.0)
    assert spearman(np.arange(5), -np.arange(5)) == pytest.approx(-1.0)


@pytest.mark.slow
def test_smollm2_gates_on_compile_tasks():
    """The gates scorer on SmolLM2-135M with `compile`'s calibration tasks at 1K (minutes on 2 CPU cores)."""
    from headpolicy import load_model
    from headpolicy.profiler.compile import CompileSettings, make_calibration

    model, tok = load_model("smollm2-135m")
    codec = T.as_codec(tok)
    s = CompileSettings(lengths=(1024,), heldout=False)
    tasks = make_calibration(codec, s).scoring
    run = train_gates(model, tasks, sink=s.sink, window=s.window)
    assert run.scores.shape == (30, 3) and np.isfinite(run.scores).all()
    assert ((run.gates >= 0) & (run.gates <= 1)).all()
    assert run.sink + run.window <= 1024 // 8  # trained with the window scaled to the 1K tasks
    assert 0 < (run.gates > 0.5).sum() < run.gates.size  # some heads kept, some let go
    assert run.steps <= GateSettings().max_steps
