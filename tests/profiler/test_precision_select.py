"""--precision auto: KV bits as a selection axis (quantisation estimates, byte costs, the objective sees it)."""

import numpy as np
import pytest

from headpolicy import BudgetError, HeadPolicy, describe_model
from headpolicy.policies.precision import kv_head_bytes
from headpolicy.profiler import compile as C
from headpolicy.profiler import objective as O
from headpolicy.profiler import tasks as T
from headpolicy.profiler.scorers.causal import estimate, estimate_with_precision
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
    est, qest = estimate_with_precision(model, calib, [(1, 8)], (8, 4), kv_group=8, kv_residual=4, ref=ref)
    np.testing.assert_allclose(est, estimate(model, calib, [(1, 8)], ref=ref))  # the window estimates unchanged
    assert qest.shape == (3, 2, 2, 2, 2) and np.isfinite(qest).all()
    assert (qest[1, :, :, 1] >= qest[1, :, :, 0]).all() and (qest[1] > 0).all()  # int4 costs more than int8
    assert (qest[2] == 0).all()  # quantisation drops no attention mass


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
    native = C.compile_policy(model, CODEC, C.CompileSettings(kv_budget=0.2, **FAST)).policy
    assert native.num_quantized == 0 and native.results["precision"] == "native"


def test_option_table_costs_are_exact_bytes():
    info = describe_model(tiny_llama(layers=2))
    s = C.CompileSettings(kv_budget=0.5, precision="auto", **FAST)
    scored = C.Scored(((4, 8), (4, 32)), np.zeros((2, 2, 2)), {}, per_head=True, quant=np.ones((2, 2, 2, 2)))
    columns, losses, costs = C.option_table(scored, info, s, dtype_bytes=2)
    assert len(columns) == 9 and columns[0] == (None, 16) and losses[:, 0].max() == 0
    for c, (rule, bits) in enumerate(columns):
        sink, window = rule if rule is not None else (None, None)
        assert (costs[:, c] == kv_head_bytes(400, head_dim=info.head_dim, dtype_bytes=2, bits=bits, sink=sink,
                                             window=window, group=8, residual=8)).all()  # fmt: skip
        assert (losses[:, c] == (bits != 16)).all()  # the streaming estimate (0 here) + quantisation's (1)


@pytest.mark.parametrize("bad", [dict(method="attention_mass"), dict(budget=0.3, kv_budget=None),
                                 dict(estimate="dropped_mass"), dict(precision="int4")])  # fmt: skip
def test_auto_precision_needs_causal_estimates_and_a_byte_budget(bad):
    s = C.CompileSettings(**{**dict(kv_budget=0.3, precision="auto"), **bad})
    with pytest.raises(BudgetError, match="precision"):
        s.check()

