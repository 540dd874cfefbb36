"""compile's selection with compensation tokens (CompileSettings.compensate, off by default):
the knapsack pays one slot per compensated head, and the policy it writes has them."""

import numpy as np
import pytest

from headpolicy import ModelInfo
from headpolicy.profiler.compile import CompileSettings, Scored, _policy, at_head_budget, at_kv_budget, option_costs

INFO = ModelInfo("toy", "LlamaForCausalLM", 3, 4, 2, 8, "sha256:abc")


def scored(per_head=True):
    rng = np.random.default_rng(0)
    options = ((4, 16), (4, 64))
    losses = rng.random((3, 2, 2))
    losses[:, :, 1] *= 0.5  # a wider window loses less
    return Scored(options, losses, {"causal": losses[:, :, 0]}, per_head=per_head)


def test_compile_does_not_compensate_by_default():
    assert CompileSettings().compensate is False
    assert option_costs([(4, 16)], 256).tolist() == [256, 20]
    assert option_costs([(4, 16)], 256, compensate=True).tolist() == [256, 21]


@pytest.mark.parametrize("fraction", [0.2, 0.35, 0.6])
def test_kv_budget_counts_the_slot_as_the_policy_does(fraction):
    s = CompileSettings(kv_budget=fraction, compensate=True, sink=4, window=16, windows=(16, 64), reference_context=256)
    sc = scored()
    cand = at_kv_budget(sc, INFO, s, fraction)
    policy = _policy(INFO, cand.rules, sc, s.compensate)
    streaming = sum(r is not None for row in cand.rules for r in row)
    assert policy.num_compensated == streaming
    assert cand.kv_fraction == pytest.approx(policy.kv_fraction(256, chosen_only=True))
    assert cand.kv_fraction <= fraction


def test_head_budget_counts_the_slot():
    s = CompileSettings(budget=0.5, method="attention_mass", compensate=True, sink=4, window=16, reference_context=256)
    sc = scored(per_head=False)
    sc = Scored(((4, 16),), sc.losses[:, :, :1], {"attention_mass": sc.losses[:, :, 0]}, per_head=False)
    cand = at_head_budget(sc, INFO, s)
    policy = _policy(INFO, cand.rules, sc, True)
    assert cand.kv_fraction == pytest.approx(policy.kv_fraction(256, chosen_only=True))
