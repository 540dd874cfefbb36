"""compile's --target-drop search with a scripted objective: the smallest KV budget whose measured loss
is within tolerance, every budget tried reported, and a plain error when none is."""

import time
from dataclasses import replace

import numpy as np
import pytest

from headpolicy import BudgetError
from headpolicy.models import describe_model
from headpolicy.profiler import compile as C
from headpolicy.profiler import objective as O
from headpolicy.profiler import tasks as T
from headpolicy.runtime.state import applied
from tests.conftest import tiny_llama

CODEC = T.CharCodec(97)
FAST = dict(lengths=(400,), depths=(0.5,), kinds=("passkey",), text_length=500, text_from=100, sink=4, window=8,
            windows=(8, 32), heldout=False, reference_context=400, repair_seconds=0.0)  # fmt: skip


@pytest.fixture
def scripted(monkeypatch):
    """measure() reports a loss that falls with the KV a policy keeps; records the fractions measured."""
    measured: list[float] = []

    def fake_measure(model, calib, ref, progress=None):
        policy = applied(model).policy
        kv = policy.kv_fraction(400)
        measured.append(kv)
        return O.Loss(0.0, 0.0, 0.0, 1.0, 0.1 * (1 - kv), 1)  # text NLL: 0.1 nats at no KV, 0 at full

    monkeypatch.setattr(O, "measure", fake_measure)
    return measured


def test_target_drop_finds_the_smallest_passing_kv_budget(scripted):
    s = C.CompileSettings(target_drop=5.0, max_kv_budget=1.0, **FAST)  # passes iff 0.1 (1 - kv) <= ln 1.05
    policy = C.compile_policy(tiny_llama(layers=2, vocab=97), CODEC, s).policy
    search = policy.results["search"]
    grid = [b for b in s.kv_grid if b <= 1.0]
    assert search[0]["kv_budget"] == grid[(len(grid) - 1) // 2]  # the middle first
    assert all(step["ok"] == (step["kv_fraction"] >= 1 - 10 * np.log(1.05)) for step in search)
    chosen = min(step["kv_budget"] for step in search if step["ok"])
    assert chosen < 1.0 and all(not step["ok"] for step in search if step["kv_budget"] < chosen)
    assert policy.results["kv_fraction_chosen_heads"] <= chosen + 1e-9
    assert policy.results["calibration"]["loss"]["ppl_ratio"] <= 1.05
    assert len(scripted) == len([s for s in search if s["kv_fraction"] < 1])  # all-full is never run


def test_no_passing_budget_is_one_plain_error_with_every_loss(scripted):
    s = C.CompileSettings(target_drop=1.0, max_kv_budget=0.5, **FAST)
    with pytest.raises(BudgetError) as err:
        C.compile_policy(tiny_llama(layers=2, vocab=97), CODEC, s)
    msg = str(err.value)
    assert "no KV budget up to 50%" in msg and "KV 50%: perplexity x" in msg and "\n" not in msg
    assert len(scripted) == 2  # the middle and the largest budget failed: nothing else is tried


def test_kv_budget_uses_per_head_windows_within_the_bytes():
    s = C.CompileSettings(kv_budget=0.3, **FAST)
    report = C.compile_policy(tiny_llama(layers=2, vocab=97), CODEC, s)
    policy = report.policy
    assert report.estimates.shape == (2, 2, 2)
    assert policy.kv_fraction(400) <= 0.3 + 1e-9
    streaming = [(li, h) for li in range(2) for h in range(2) if not policy.layers[li][h].is_retrieval]
    windows = {policy.head_window(li, h)[1] for li, h in streaming}
    assert windows <= {8, 32}
    assert np.isfinite(policy.results["calibration"]["loss"]["value"])


def test_repair_swaps_until_the_measured_objective_stops_falling():
    """The estimates call head (0, 1) the cheapest to stream; measuring says it must keep everything.
    The knapsack streams it; the repair swaps, riskiest head first, and keeps the swap that helps."""
    info = describe_model(tiny_llama(layers=2, vocab=97))
    s = C.CompileSettings(kv_budget=0.5, repair_patience=3, **FAST)  # context 400: full 400, windows 12 / 36 tokens
    losses = np.tile([0.2, 0.1], (2, 2, 1))
    losses[0, 1] = [0.01, 0.005]
    scored = C.Scored(s.options(per_head=True), losses, {}, per_head=True)
    runs = []

    def measure(cand):
        runs.append(cand.rules)
        streaming = sum(r is not None for row in cand.rules for r in row)
        return O.Loss(0.0, 0.0, 0.0, 1.0, (1.0 if cand.rules[0][1] is not None else 0.0) + 0.01 * streaming, 1)

    measure.seconds = 0.0  # how long a measurement takes (the Measurer's own attribute)
    start = C._measured(C.at_kv_budget(scored, info, s, 0.5), measure)
    assert start.rules[0][1] == (4, 32) and start.loss.value > 1  # one retrieval head fits: not (0, 1)
    start = replace(start, tried=({"quant_weight": 1.0, "value": start.loss.value},))  # what `weighed` records
    best, swaps = C.repair(start, scored, info, s, measure, deadline=float("inf"))
    assert best.rules[0][1] is None and best.loss.value == pytest.approx(0.03)
    assert best.tried == start.tried  # the swapped candidate still carries the weights' record
    assert best.kv_fraction <= 0.5 + 1e-9
    assert [w["kept"] for w in swaps] == [False, False, True]  # then no head can get more bytes: stop
    assert swaps[2] == {"layer": 0, "kv_head": 1, "from": "window 32", "to": "full", "changed_heads": 2,
                        "value": pytest.approx(0.03), "kept": True}  # fmt: skip
    assert len(runs) == 1 + len(swaps) and len({str(r) for r in runs}) == len(runs)  # nothing measured twice
    late, none = C.repair(start, scored, info, s, measure, deadline=0.0)
    assert late is start and none == []  # out of time: the knapsack's answer, as measured
    measure.seconds = 50.0
    late, none = C.repair(start, scored, info, s, measure, deadline=time.perf_counter() + 30.0)
    assert late is start and none == []  # a measurement would end past the deadline: none starts


def test_a_second_pass_rescores_at_the_first_choice_and_keeps_the_larger_loss(monkeypatch):
    """--passes 2: the estimates are run again, linearised at the policy the first ones choose at
    the budget; every option's loss is the larger of the two, and the budget still holds."""
    calls = []
    real = C.estimate

    def recording_estimate(*args, rules=None, **kwargs):
        calls.append(rules)
        return real(*args, rules=rules, **kwargs)

    monkeypatch.setattr(C, "estimate", recording_estimate)
    model = tiny_llama(layers=2, vocab=97)
    s = C.CompileSettings(kv_budget=0.3, precision="native", **FAST)  # the windows' estimates alone
    info = describe_model(model)
    data = C.make_calibration(CODEC, s)
    ref = O.reference(model, data.calib)
    first = C.score(model, data, ref, s)
    point = C.at_kv_budget(first, info, s, 0.3)
    second = C.rescore(model, data, ref, s, first, info)
    assert calls == [None, point.rules] and any(r is not None for row in point.rules for r in row)
    assert (second.losses >= first.losses).all() and (second.losses > first.losses).any()

    report = C.compile_policy(model, CODEC, C.CompileSettings(kv_budget=0.3, passes=2, precision="native", **FAST))
    assert "rescore" in report.seconds and report.policy.kv_fraction(400) <= 0.3 + 1e-9
    with pytest.raises(BudgetError, match="--passes"):
        C.CompileSettings(passes=3).check()


def test_the_heldout_check_runs_only_within_the_time_budget():
    """The held-out measurement is a report: it runs when it fits in --time-budget, and otherwise
    the policy says why it did not, in one line."""
    model = tiny_llama(layers=2, vocab=97)
    settings = {**FAST, "heldout": True, "kv_budget": 0.3}
    late = C.compile_policy(model, CODEC, C.CompileSettings(**settings, time_budget=0.0))
    note = late.policy.results["heldout"]["skipped"]
    assert "--time-budget 0 s" in note and "\n" not in note and "heldout" not in late.seconds
    ran = C.compile_policy(model, CODEC, C.CompileSettings(**settings, time_budget=3600.0))
    assert set(ran.policy.results["heldout"]["loss"]) >= {"ppl_ratio", "ans_kept"} and "heldout" in ran.seconds


def test_the_depth_grid_puts_every_depth_at_every_kind_and_length():
    """By default the depths take turns over the (kind, length) pairs, one task each; --depth-grid
    gives each pair every depth (so every kind reaches past the longest window at the longest
    length), with seeds of their own."""
    s = dict(lengths=(300, 400), depths=(0.2, 0.5, 0.8), kinds=("passkey", "code"), text_length=500,
             text_from=100, heldout=False)  # fmt: skip
    turns = C.make_calibration(CODEC, C.CompileSettings(**s)).calib.tasks
    assert [(t.kind, t.length, t.depth) for t in turns] == [
        ("passkey", 300, 0.2), ("passkey", 400, 0.5), ("code", 300, 0.8), ("code", 400, 0.2)]  # fmt: skip
    grid = C.make_calibration(CODEC, C.CompileSettings(**s, depth_grid=True)).calib.tasks
    cells = [(t.kind, t.length, t.depth) for t in grid]
    assert cells == [(k, n, d) for k in s["kinds"] for n in s["lengths"] for d in s["depths"]]
    assert len({t.seed for t in grid}) == len(grid) and len({t.answer for t in grid}) == len(grid)
    assert [t.answer for t in grid[:1]] == [t.answer for t in turns[:1]]  # the first task is the same one
