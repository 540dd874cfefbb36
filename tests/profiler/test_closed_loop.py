"""compile's closed loop with a scripted model: a held-out task is answered iff the heads it needs keep their cache."""

import numpy as np
import pytest

from headpolicy.profiler import scorers
from headpolicy.profiler import tasks as T
from headpolicy.profiler.compile import CompileSettings, compile_policy
from headpolicy.runtime import generate as G
from headpolicy.runtime.state import applied
from tests.conftest import tiny_llama

CODEC = T.CharCodec(97)
NEEDS = {1: [(0, 0), (1, 1)], 2: [(1, 1)]}  # depth index -> (layer, kv head) the task needs; index 0: unanswerable


@pytest.fixture
def runs(monkeypatch):
    """Scripted answers and a fixed score map; returns (retrieval heads, task name) of every policy run."""
    log: list[tuple[int, str]] = []

    def scripted(model, decode, task, **kw):
        j = task.seed % 1000  # task_grid: seed * 1000 + depth index
        state = applied(model)
        if state is None:  # the full model answers all but the depth-0 tasks
            return G.Outcome(task, j != 0, "", 0)
        log.append((state.policy.num_retrieval, task.name()))
        table = state.policy.retrieval_table()
        return G.Outcome(task, j in NEEDS and all(table[li][h] for li, h in NEEDS[j]), "", 0)

    fixed = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)  # (0,0) first, then (1,1)
    monkeypatch.setattr(G, "answer", scripted)
    scorers.get_scorer("attention_mass")  # load the registry before replacing an entry
    monkeypatch.setitem(scorers._SCORERS, "attention_mass",
                        scorers.Scorer("attention_mass", "fixed", T.NEEDLE_KINDS, lambda *a, **k: fixed))  # fmt: skip
    return log


def test_closed_loop_picks_the_smallest_passing_budget_and_stops_failing_candidates_early(runs):
    s = CompileSettings(method="attention_mass", lengths=(600,), depths=(0.5,), heldout_lengths=(600, 700),
                        heldout_depths=(0.2, 0.4, 0.6), repeat_length=300, sink=4, window=8,
                        budgets=(0.25, 0.5, 0.75, 1.0))  # fmt: skip
    policy = compile_policy(tiny_llama(vocab=97), CODEC, s).policy
    r = policy.results
    assert policy.num_retrieval == 2 and r["budget"] == 0.5
    held = r["heldout"]
    assert held["tasks"] == 12 and held["full_accuracy"] == pytest.approx(100 * 8 / 12)
    assert held["policy_accuracy"] == held["full_accuracy"]
    assert all(name.split("/s")[-1][-1] != "0" for _, name in runs)  # unanswered tasks never ran with a policy
    steps = {step["retrieval_heads"]: step for step in r["search"]}
    # 1 head fails its first task; tolerance 2 points of 12 tasks allows no miss, so it stops there
    assert not steps[1]["ok"] and steps[1]["stopped_early"] and sum(k == 1 for k, _ in runs) == 1
    assert steps[2]["ok"] and not steps[2]["stopped_early"] and sum(k == 2 for k, _ in runs) == 8
    assert not steps[4]["evaluated"]  # all retrieval is the full model
