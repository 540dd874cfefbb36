"""The selection objective (teacher-forced loss against the full model) and the causal estimate of it."""

import numpy as np
import pytest
import torch

from headpolicy import HeadPolicy, describe_model
from headpolicy.policies.stats import spearman
from headpolicy.profiler import objective as O
from headpolicy.profiler import tasks as T
from headpolicy.profiler.scorers.causal import estimate
from headpolicy.runtime.generate import applied_copy
from tests.conftest import tiny_llama

CODEC = T.CharCodec(97)


def calibration(n_tasks=2, length=320, text=200, text_from=40):
    tasks = tuple(T.passkey(CODEC, length, d, seed=i) for i, d in enumerate((0.2, 0.7)[:n_tasks]))
    rng = np.random.default_rng(0)
    texts = (tuple(int(x) for x in rng.integers(3, 97, size=text)),)
    return O.Calibration(tasks, texts, text_from)


def answered_everything(ref):
    """A random model answers nothing: count every task as answered so the answer terms are exercised."""
    ref.answered = [True] * len(ref.answered)
    return ref


def single_head(model, layer, head, sink, window) -> HeadPolicy:
    info = describe_model(model)
    rules = [[None] * info.num_kv_heads for _ in range(info.num_layers)]
    rules[layer][head] = (sink, window)
    return HeadPolicy.from_rules(info, rules)


def test_an_all_retrieval_policy_loses_nothing():
    model = tiny_llama(layers=2, seed=1)
    calib = calibration()
    ref = answered_everything(O.reference(model, calib))
    policy = HeadPolicy.from_kinds(describe_model(model), [[True, True]] * 2)
    loss = O.measure(applied_copy(model, policy), calib, ref)
    assert abs(loss.ans_drop) < 1e-5 and abs(loss.text_dnll) < 1e-5 and loss.ans_kl < 1e-6
    assert loss.ans_kept == 1.0 and loss.tasks == 2 and loss.within(0.0001)


def test_streaming_every_head_is_measured_as_a_loss():
    model = tiny_llama(layers=2, seed=1)
    calib = calibration()
    ref = answered_everything(O.reference(model, calib))
    policy = HeadPolicy.from_kinds(describe_model(model), [[False, False]] * 2, sink=1, window=4)
    loss = O.measure(applied_copy(model, policy), calib, ref)
    assert loss.ans_kl > 0 and loss.text_dnll != 0 and loss.value == pytest.approx(loss.ans_drop + loss.text_dnll)
    assert loss.ans_drop_max >= loss.ans_drop
    assert not O.Loss(0.0, 0.0, 0.0, 0.5, 0.0, 2).within(10)  # an answer lost fails whatever the tolerance
    assert not O.Loss(0.0, 0.0, 0.0, 1.0, 0.03, 2).within(2) and O.Loss(0.0, 0.0, 0.0, 1.0, 0.019, 2).within(2)


def test_text_must_be_longer_than_text_from():
    with pytest.raises(ValueError, match="longer than text_from"):
        O.Calibration((), ((1, 2, 3),), 5)


@pytest.mark.parametrize("seed", [0, 1])
def test_causal_estimate_ranks_single_head_effects(seed):
    """The first-order estimate of streaming one head (for each option) against the measured change."""
    torch.manual_seed(seed)
    model = tiny_llama(layers=2, seed=seed)
    calib = calibration()
    ref = answered_everything(O.reference(model, calib))
    options = [(1, 8), (2, 32)]
    est = estimate(model, calib, options, ref=ref, answer_loss="nll")[0]  # the first-order estimate
    assert est.shape == (2, 2, 2) and np.isfinite(est).all()
    measured = np.zeros_like(est)
    for li in range(2):
        for h in range(2):
            for j, (sink, window) in enumerate(options):
                m = applied_copy(model, single_head(model, li, h, sink, window))
                measured[li, h, j] = O.measure(m, calib, ref).value
    assert spearman(est, measured) > 0.8
    np.testing.assert_allclose(est, measured, rtol=0.5, atol=2e-3)  # small changes: close to linear


@pytest.mark.parametrize("S", [37, 300])
def test_layer_effects_equal_running_each_option(monkeypatch, S):
    """The cumulative-sum shortcut equals g . (streaming output - full output) computed by running
    the runtime's streaming op for every option (odd lengths, GQA, chunks, sink 0 included)."""
    from headpolicy.profiler.scorers import causal
    from headpolicy.runtime.attention import streaming_heads

    monkeypatch.setattr(causal, "CHUNK", 64)
    gen = torch.Generator().manual_seed(S)
    B, Hkv, G, D = 2, 3, 2, 8
    q, k, v = (torch.randn(B, h, S, D, generator=gen) for h in (Hkv * G, Hkv, Hkv))
    scale = 0.4
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    g = torch.randn(B, Hkv * G, S, D, generator=gen)
    delta = torch.zeros_like(full, requires_grad=True)
    options = [(0, 5), (2, 9), (4, 33)]
    got = causal._layer_effects(causal._Layer(q, k, v, full, delta, scale), options, G, [g, -2 * g])
    ranks = torch.arange(S).expand(B, S)
    for j, (sink, window) in enumerate(options):
        o = streaming_heads(q, k, v, ranks, ranks, sink, window, scale)
        want = (g * (o - full)).double().sum(dim=(0, 2, 3)).view(Hkv, G).sum(-1)
        torch.testing.assert_close(got[0, :, j], want, rtol=1e-4, atol=1e-5)
        assert (got[1, :, j] >= got[0, :, j].abs() - 1e-6).all()  # |sum| <= sum of |.|
        torch.testing.assert_close(got[4, :, j], -2 * want, rtol=1e-4, atol=1e-5)  # a further gradient
    assert (got[2, :, 0] >= got[2, :, 1]).all() and (got[2] >= 0).all()  # a shorter window drops more
    torch.testing.assert_close(got[3], got[2])  # every row is a target row
    tail = causal._layer_effects(causal._Layer(q, k, v, full, delta, scale), options, G, [g], targets=S - 7)
    p = torch.softmax((q @ k.repeat_interleave(G, 1).transpose(-1, -2) * scale).masked_fill(
        torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf")), dim=-1)  # fmt: skip
    for j, (sink, window) in enumerate(options):
        i, key = torch.arange(S)[:, None], torch.arange(S)[None, :]
        dropped = (key >= sink) & (key <= i - window) & (i >= S - 7)  # the last 7 rows only
        want = (p * dropped).double().sum(dim=(0, 2, 3)).view(Hkv, G).sum(-1)
        torch.testing.assert_close(tail[3, :, j], want, rtol=1e-5, atol=1e-6)


def test_answer_log_odds_do_not_saturate():
    """When the model is sure of the answer, the NLL's gradient vanishes; the log-odds' does not."""
    from headpolicy.profiler.scorers.causal import _answer_loss

    logits = torch.tensor([[12.0, 0.0, 1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0])
    p = float(torch.softmax(logits.detach(), -1)[0, 0])
    assert _answer_loss(logits, target, "log_odds").item() == pytest.approx(-(np.log(p) - np.log1p(-p)), rel=1e-9)
    nll_grad = torch.autograd.grad(_answer_loss(logits, target, "nll"), logits)[0]
    odds_grad = torch.autograd.grad(_answer_loss(logits, target, "log_odds"), logits)[0]
    assert nll_grad.abs().max() < 1e-4 and odds_grad[0, 0] == pytest.approx(-1.0)


def test_sampled_query_blocks_are_unbiased_and_keep_the_heavy_rows(monkeypatch):
    """With `chunks`, a few blocks of query rows drawn by gradient norm and weighted by 1 / probability:
    the average over draws is the exact sum, and a block holding most of the gradient is always in."""
    from headpolicy.profiler.scorers import causal

    monkeypatch.setattr(causal, "CHUNK", 16)
    gen = torch.Generator().manual_seed(0)
    B, Hkv, G, D, S = 1, 2, 2, 8, 160
    q, k, v = (torch.randn(B, h, S, D, generator=gen) for h in (Hkv * G, Hkv, Hkv))
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.4, enable_gqa=True)
    g = torch.randn(B, Hkv * G, S, D, generator=gen)
    g[:, :, 96:112] *= 30  # the "answer" block
    lay = causal._Layer(q, k, v, full, torch.zeros_like(full), 0.4)
    options = [(0, 16), (2, 40)]  # query blocks start at row 16
    exact = causal._layer_effects(lay, options, G, [g])
    assert torch.equal(causal._layer_effects(lay, options, G, [g], chunks=50, gen=gen), exact)  # enough: all
    draws, counts = [], []
    for _ in range(300):
        blocks = causal._blocks(16, S, [g], 3, gen)
        assert (96, 1.0) in blocks
        counts.append(len(blocks))
        draws.append(causal._layer_effects(lay, options, G, [g], chunks=3, gen=gen))
    assert 2.7 < np.mean(counts) < 3.3  # 3 blocks expected, of 9
    mean = torch.stack(draws).mean(0)
    torch.testing.assert_close(mean[0], exact[0], rtol=0.1, atol=0.05 * float(exact[0].abs().max()))
    torch.testing.assert_close(mean[2], exact[2], rtol=0.1, atol=0.0)


def test_sampled_quantisation_effects_average_to_the_exact_sum(monkeypatch):
    """The quantisation effects over a few query blocks drawn by gradient norm: all blocks give the
    one-pass sum, and the average over draws is it too."""
    from headpolicy.profiler.scorers import causal

    monkeypatch.setattr(causal, "CHUNK", 16)
    gen = torch.Generator().manual_seed(1)
    B, Hkv, G, D, S = 1, 2, 2, 8, 160
    q, k, v = (torch.randn(B, h, S, D, generator=gen) for h in (Hkv * G, Hkv, Hkv))
    k[..., 3] *= 6  # an outlier channel: per-channel keys and per-token keys quantise apart
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.4, enable_gqa=True)
    g = torch.randn(B, Hkv * G, S, D, generator=gen)
    g[:, :, 96:112] *= 30
    lay = causal._Layer(q, k, v, full, torch.zeros_like(full), 0.4)
    args = (lay, (8, 4), G, 8, 4, [g])
    exact = causal._quant_effects(*args)
    torch.testing.assert_close(causal._quant_effects(*args, chunks=50, gen=gen), exact)  # every block, weight 1
    draws = torch.stack([causal._quant_effects(*args, chunks=3, gen=gen) for _ in range(300)])
    scale = float(exact[1].abs().max())
    torch.testing.assert_close(draws.mean(0)[0], exact[0], rtol=0.1, atol=0.05 * scale)
    torch.testing.assert_close(draws.mean(0)[1], exact[1], rtol=0.1, atol=0.05 * scale)
    assert (exact[1] > 0).all() and not torch.equal(draws[0], draws[1])  # the draws differ: it samples


def _weighted_kl(full, policy, calib) -> float:
    """sum over sequences of weight * sum over target positions of KL(full || policy), as the estimate weighs it."""
    from headpolicy.profiler.scorers.causal import _sequences

    total = 0.0
    with torch.no_grad():
        for ids, first, weight, _ in _sequences(calib, None):
            keep = ids.shape[1] - first + 1
            lp = [torch.log_softmax(m(ids, use_cache=False, logits_to_keep=keep).logits[0, :-1].double(), -1)
                  for m in (full, policy)]  # fmt: skip
            total += weight * float((lp[0].exp() * (lp[0] - lp[1])).sum())
    return total


def test_fisher_estimate_is_the_second_order_kl():
    """With enough sampled labels, the Fisher estimate of streaming one head matches the KL it causes."""
    model = tiny_llama(layers=2, seed=2)
    calib = calibration()
    options = [(1, 8), (2, 32)]
    fisher = estimate(model, calib, options, samples=24, seed=1)[3]
    kl = np.zeros_like(fisher)
    for li in range(2):
        for h in range(2):
            for j, (sink, window) in enumerate(options):
                kl[li, h, j] = _weighted_kl(model, applied_copy(model, single_head(model, li, h, sink, window)), calib)
    assert (fisher >= 0).all() and spearman(fisher, kl) > 0.7
    np.testing.assert_allclose(fisher, kl, rtol=0.6)  # a sampled estimate: right to within its noise


def test_estimate_parts_add_up_and_split_keeps_answers_at_the_smallest_window():
    from headpolicy.profiler.scorers.causal import ESTIMATES, losses

    model = tiny_llama(layers=2, seed=3)
    calib = calibration()
    ref = answered_everything(O.reference(model, calib))
    est = estimate(model, calib, [(1, 8), (2, 32), (2, 64)], ref=ref)
    part = {name: est[i] for i, name in enumerate(ESTIMATES)}
    np.testing.assert_allclose(part["answer_abs"] + part["text_abs"], part["abs_first_order"], rtol=1e-9)
    assert (part["answer_mass"] <= part["target_mass"] + 1e-12).all() and (part["answer_mass"] > 0).any()
    split = losses(est, "split")
    np.testing.assert_allclose(split - part["text_abs"], np.repeat(part["answer_abs"][:, :, :1], 3, axis=2))
    np.testing.assert_array_equal(losses(est, "dropped_mass"), part["dropped_mass"])


def test_linearised_at_a_policy_the_forward_is_that_policy():
    """With `rules`, the recording forward runs each head as the policy says: the same logits as
    the runtime running that policy (mixed windows in one layer, a retrieval head beside them)."""
    from headpolicy.profiler.scorers import causal

    model = tiny_llama(layers=2, heads=6, kv_heads=3, seed=2)
    info = describe_model(model)
    rules = [[(1, 8), None, (2, 32)], [(2, 32), (2, 32), None]]
    ids = torch.tensor([list(calibration().texts[0])])
    with torch.no_grad():
        want = applied_copy(model, HeadPolicy.from_rules(info, rules))(ids, use_cache=False).logits
        with causal._recording(model, None, rules):
            got = model(ids, use_cache=False).logits
        full = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - full).abs().max() > 1e-3  # the policy does change the output


def test_estimate_at_the_full_policy_is_the_plain_estimate_and_a_policy_point_predicts_restoring():
    """rules of all-None reproduce the plain estimate exactly. At a policy streaming every head,
    the head's own option's estimate orders what restoring that head alone measurably recovers."""
    model = tiny_llama(layers=2, seed=4)
    calib = calibration()
    ref = answered_everything(O.reference(model, calib))
    info = describe_model(model)
    options = [(1, 8)]
    plain = estimate(model, calib, options, ref=ref, answer_loss="nll")
    none = [[None] * info.num_kv_heads for _ in range(info.num_layers)]
    np.testing.assert_array_equal(estimate(model, calib, options, ref=ref, answer_loss="nll", rules=none), plain)

    streaming = [[(1, 8)] * info.num_kv_heads for _ in range(info.num_layers)]
    at_policy = estimate(model, calib, options, ref=ref, answer_loss="nll", rules=streaming)[0][:, :, 0]
    assert not np.allclose(at_policy, plain[0][:, :, 0])
    base = O.measure(applied_copy(model, HeadPolicy.from_rules(info, streaming)), calib, ref).value
    recovered = np.zeros_like(at_policy)
    for li in range(info.num_layers):
        for h in range(info.num_kv_heads):
            rules = [list(row) for row in streaming]
            rules[li][h] = None
            restored = applied_copy(model, HeadPolicy.from_rules(info, rules))
            recovered[li, h] = base - O.measure(restored, calib, ref).value
    assert spearman(at_policy, recovered) > 0.7
    np.testing.assert_allclose(at_policy, recovered, rtol=0.5, atol=3e-3)  # small changes: close to linear
