"""--precision auto: KV bits as a selection axis (quantisation estimates, byte costs, the objective sees it)."""

import numpy as np
import pytest

from headpolicy import BudgetError, HeadPolicy, describe_model
from headpolicy.policies.precision import kv_head_bytes
from headpolicy.profiler import compile as C
from headpolicy.profiler import objective as O
from headpolicy.profiler import tasks as T
from headpolicy.profiler.scorers.causal import ESTIMATES, estimate, estimate_with_precision
from headpolicy.runtime.generate import applied_copy
from tests.conftest import tiny_llama
from tests.profiler.test_objective import answered_everything, calibration

CODEC = T.CharCodec(97)
FAST = dict(lengths=(400,), depths=(0.5,), kinds=("passkey",), text_length=500, text_from=100, sink=4, window=8,
            windows=(8, 32), heldout=False, reference_context=400, kv_group=8, kv_residual=8)  # fmt: skip


def test_the_objective_sees_quantised_heads_through_the_cache():
    """Teacher-forced measurement of a quantised policy runs over the split cache: int4 on every
    head costs something, int8 less, native nothing."""
    model = tiny_llama(layers=2, seed=1)
    calib = calibration()
    ref = answered_everything(O.reference(model, calib))
    info = describe_model(model)
    values = {}
    for bits in (16, 8, 4):
        policy = HeadPolicy.from_rules(info, [[None, None]] * 2, bits=[[bits] * 2] * 2, kv_group=8, kv_residual=4)
        values[bits] = O.measure(applied_copy(model, policy), calib, ref).ans_kl
    assert values[16] < 1e-9 < values[8] < values[4]


def test_quantisation_estimates_follow_the_bits_and_share_the_pass():
    model = tiny_llama(layers=2, seed=2)
    calib = calibration()
    ref = answered_everything(O.reference(model, calib))
    est, qest = estimate_with_precision(model, calib, [(1, 8)], (8, 4), kv_group=8, kv_residual=4, ref=ref, samples=2)
    np.testing.assert_allclose(est, estimate(model, calib, [(1, 8)], ref=ref, samples=2))  # window estimates unchanged
    assert qest.shape == (len(ESTIMATES), 2, 2, 2, 2) and np.isfinite(qest).all()  # the first four filled
    assert (qest[1, :, :, 1] >= qest[1, :, :, 0]).all() and (qest[1] > 0).all()  # int4 costs more than int8
    assert (qest[2] == 0).all()  # quantisation drops no attention mass
    assert (qest[3] >= 0).all() and (qest[3] > 0).any()  # the second-order estimate, from the same samples


def test_auto_precision_fills_the_bytes_with_bits_and_windows():
    s = C.CompileSettings(kv_budget=0.2, precision="auto", **FAST)
    model = tiny_llama(layers=2, vocab=97)
    report = C.compile_policy(model, CODEC, s)
    policy = report.policy
    assert policy.results["precision"] == "auto" and policy.num_quantized > 0
    assert policy.kv_fraction(400) <= 0.2 + 1e-9  # exact bytes, codes and scales counted
    info = describe_model(model)
    full = kv_head_bytes(400, head_dim=info.head_dim, dtype_bytes=4)
    assert policy.kv_bytes(400) <= 0.2 * full * policy.num_heads
    assert np.isfinite(policy.results["calibration"]["loss"]["value"])
    assert HeadPolicy.from_yaml(policy.to_yaml()).bits_table() == policy.bits_table()
    native = C.compile_policy(model, CODEC, C.CompileSettings(kv_budget=0.2, precision="native", **FAST)).policy
    assert native.num_quantized == 0 and native.results["precision"] == "native"


def test_precision_defaults_to_auto_where_it_applies():
    """No --precision: auto with the causal estimates and a byte budget or the target search,
    native where auto cannot run (a head budget, another scorer); the policy records which."""
    assert C.CompileSettings().resolved_precision == "auto"
    assert C.CompileSettings(kv_budget=0.3).resolved_precision == "auto"
    assert C.CompileSettings(budget=0.3).resolved_precision == "native"
    assert C.CompileSettings(method="attention_mass").resolved_precision == "native"
    assert C.CompileSettings(kv_budget=0.3, precision="native").resolved_precision == "native"
    C.CompileSettings(budget=0.3).check()  # the default never turns a valid command into an error
    policy = C.compile_policy(tiny_llama(layers=2, vocab=97), CODEC, C.CompileSettings(kv_budget=0.2, **FAST)).policy
    assert policy.results["precision"] == "auto" and policy.provenance.settings["precision"] == "auto"


def test_option_table_costs_are_exact_bytes():
    info = describe_model(tiny_llama(layers=2))
    s = C.CompileSettings(kv_budget=0.5, precision="auto", **FAST)
    scored = C.Scored(((4, 8), (4, 32)), np.zeros((2, 2, 2)), {}, per_head=True, quant=np.ones((2, 2, 2, 2)))
    columns, losses, costs = C.option_table(scored, info, s, dtype_bytes=2)
    assert len(columns) == 9 and columns[0] == (None, 16) and losses[:, 0].max() == 0
    for c, (rule, bits) in enumerate(columns):
        sink, window = rule if rule is not None else (None, None)
        assert (costs[:, c] == kv_head_bytes(400, head_dim=info.head_dim, dtype_bytes=2, bits=bits, sink=sink,
                                             window=window, group=8, residual=8, allocated=True)).all()  # fmt: skip
        assert (losses[:, c] == (bits != 16)).all()  # the streaming estimate (0 here) + quantisation's (1)


@pytest.mark.parametrize("bad", [dict(method="attention_mass"), dict(budget=0.3, kv_budget=None),
                                 dict(estimate="dropped_mass"), dict(precision="int4")])  # fmt: skip
def test_auto_precision_needs_causal_estimates_and_a_byte_budget(bad):
    s = C.CompileSettings(**{**dict(kv_budget=0.3, precision="auto"), **bad})
    with pytest.raises(BudgetError, match="precision"):
        s.check()


@pytest.mark.parametrize("fraction", [0.15, 0.3, 0.6])
def test_auto_precision_with_compensation_keeps_compensated_heads_native_and_counts_their_slot(fraction):
    """compensate + --precision auto: streaming options only at 16 bits (a quantised head may not
    compensate), retrieval at 16/8/4; the knapsack's bytes are the policy's, slot sums included."""
    info = describe_model(tiny_llama(layers=2))
    s = C.CompileSettings(kv_budget=fraction, precision="auto", compensate=True, **FAST)
    rng = np.random.default_rng(1)
    scored = C.Scored(((4, 8), (4, 32)), rng.random((2, 2, 2)), {}, per_head=True, quant=rng.random((2, 2, 2, 2)))
    columns, _, costs = C.option_table(scored, info, s, dtype_bytes=2)
    assert columns == [(None, 16), (None, 8), (None, 4), ((4, 8), 16), ((4, 32), 16)]
    slot = 2 * info.head_dim * 4  # compensation_bytes: float32 sums of keys and values
    assert costs[0, 3] == kv_head_bytes(400, head_dim=info.head_dim, dtype_bytes=2, sink=4, window=8) + slot
    cand = C.at_kv_budget(scored, info, s, fraction, dtype_bytes=2)
    policy = C._candidate_policy(info, cand, scored, s)  # a valid policy: no head both quantised and compensated
    streaming = [(li, hi) for li in range(2) for hi in range(2) if cand.rules[li][hi] is not None]
    assert all(policy.head_compensates(li, hi) and policy.head_bits(li, hi) == 16 for li, hi in streaming)
    assert cand.kv_fraction == pytest.approx(policy.kv_fraction(400, chosen_only=True, dtype_bytes=2))
    assert cand.kv_fraction <= fraction


def test_compile_with_auto_precision_and_compensation_measures_a_valid_policy():
    s = C.CompileSettings(kv_budget=0.15, precision="auto", compensate=True, repair_seconds=0, **FAST)
    policy = C.compile_policy(tiny_llama(layers=2, vocab=97), CODEC, s).policy
    streaming = policy.num_heads - policy.num_retrieval
    heads = [(li, hi) for li in range(2) for hi in range(2)]
    assert policy.num_compensated == streaming > 0
    assert all(policy.head_bits(li, hi) == 16 for li, hi in heads if policy.head_compensates(li, hi))
    assert policy.kv_fraction(400) <= 0.15 + 1e-9  # 4-bit retrieval alone would not fit: some heads stream
    assert np.isfinite(policy.results["calibration"]["loss"]["value"])
    back = HeadPolicy.from_yaml(policy.to_yaml())  # scores are rounded in the file
    assert back.bits_table() == policy.bits_table() and back.retrieval_table() == policy.retrieval_table()
    assert [back.head_compensates(li, hi) for li, hi in heads] == [policy.head_compensates(li, hi) for li, hi in heads]


def test_quant_weights_measure_each_knapsack_and_keep_the_best():
    """--quant-weights: the quantisation estimates weighed against the windows' by each weight,
    each knapsack measured (one measurement per distinct candidate), the least measured
    objective kept and reported; a weight that makes quantising cheap buys more bits-for-heads
    than one that makes it dear."""
    model = tiny_llama(layers=2, vocab=97)
    s = C.CompileSettings(kv_budget=0.3, precision="auto", quant_weights=(1.0, 1e-3, 1e3), repair_seconds=0, **FAST)
    policy = C.compile_policy(model, CODEC, s).policy
    tried = policy.results["quant_weights"]
    assert [t["quant_weight"] for t in tried] == [1.0, 1e-3, 1e3]
    assert policy.results["calibration"]["loss"]["value"] == min(t["value"] for t in tried)
    assert all(t["kv_fraction"] <= 0.3 + 1e-9 for t in tried) and policy.kv_fraction(400) <= 0.3 + 1e-9
    cheap, dear = tried[1], tried[2]
    assert cheap["retrieval_heads"] >= dear["retrieval_heads"]
    one = C.compile_policy(model, CODEC, C.CompileSettings(kv_budget=0.3, precision="auto", repair_seconds=0,
                                                           **FAST)).policy  # fmt: skip
    assert "quant_weights" not in one.results  # the default: one weight, nothing extra measured
    for bad in [(), (0.0,), (-1.0,), (float("nan"),)]:
        with pytest.raises(BudgetError, match="--quant-weights"):
            C.CompileSettings(kv_budget=0.3, quant_weights=bad).check()


def test_quant_weights_keep_the_measured_best_and_repair_from_its_estimates(monkeypatch):
    """With a scripted objective that rewards quantised heads, the candidate of the smallest
    weight wins, and the repair swaps against the estimates it was chosen with."""
    model = tiny_llama(layers=2, vocab=97)
    info = describe_model(model)
    s = C.CompileSettings(kv_budget=0.3, precision="auto", quant_weights=(1e3, 1e-3), repair_seconds=0, **FAST)

    class Scripted:
        seconds, runs = 0.0, 0

        def __call__(self, cand):
            self.runs += 1
            quantised = sum(b != 16 for row in cand.bits for b in row)
            return O.Loss(0.0, 0.0, 0.0, 1.0, 1.0 - 0.1 * quantised, 1)

    scored = C.Scored(((4, 8), (4, 32)), np.ones((2, 2, 2)), {}, per_head=True, quant=np.ones((2, 2, 2, 2)))
    measure = Scripted()
    best, table = C.weighed(scored, info, s, 0.3, measure, dtype_bytes=4)
    assert [t["quant_weight"] for t in best.tried] == [1e3, 1e-3] and measure.runs == 2
    assert best.loss.value == min(t["value"] for t in best.tried) < best.tried[0]["value"]
    np.testing.assert_allclose(table.quant, scored.quant * 1e-3)  # what repair swaps against
