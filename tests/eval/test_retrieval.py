"""Held-out runs: early stopping and the closed loop's miss allowance."""

import pytest

from headpolicy.eval import retrieval as R
from headpolicy.profiler import tasks as T
from headpolicy.profiler.compile import allowed_misses

CODEC = T.CharCodec(97)


@pytest.fixture
def scripted(monkeypatch):
    """run_task answers task i correctly iff script[i]; records which tasks ran."""
    ran: list[int] = []

    def fake(model, codec, task, **kw):
        ran.append(task.seed)
        return R.Outcome(task, SCRIPT[task.seed], "", 0)

    SCRIPT: dict[int, bool] = {}
    monkeypatch.setattr(R, "run_task", fake)
    return SCRIPT, ran


def _tasks(n):
    return [T.passkey(CODEC, 300, 0.5, seed=i) for i in range(n)]


def test_run_tasks_stops_after_the_allowed_misses(scripted):
    script, ran = scripted
    script.update({0: True, 1: False, 2: True, 3: False, 4: True, 5: True})
    outs = R.run_tasks(None, CODEC, _tasks(6), max_misses=1)
    assert ran == [0, 1, 2, 3] and len(outs) == 4  # the second miss ends the run
    ran.clear()
    assert len(R.run_tasks(None, CODEC, _tasks(6))) == 6 and ran == list(range(6))


@pytest.mark.parametrize(("tolerance", "n", "misses"), [(2, 12, 0), (0, 5, 0), (10, 20, 2), (5, 20, 1), (100, 3, 3)])
def test_allowed_misses(tolerance, n, misses):
    assert allowed_misses(tolerance, n) == misses
