"""ThreadTuner (moekit/infer/threads.py): the decode step's thread count follows measured step times.

Oracle: a scripted clock (each step's duration is set by the thread count it ran at), so the choice the
tuner must make is known by hand.
"""

from __future__ import annotations

import pytest
import torch

from moekit.infer import threads as T


@pytest.fixture
def two_threads():
    """torch at 2 threads (the tuner's configured count) for the test, the old count restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _run(monkeypatch, cost_s: dict[int, float], steps: int, tuner: T.ThreadTuner) -> list[int]:
    clock = [0.0]
    monkeypatch.setattr(T.time, "perf_counter", lambda: clock[0])
    ran = []
    for _ in range(steps):
        tuner.before()
        ran.append(torch.get_num_threads())
        clock[0] += cost_s[torch.get_num_threads()]
        tuner.after()
    return ran


def test_the_faster_count_runs_and_the_other_is_tried_now_and_then(monkeypatch, two_threads):
    tuner = T.ThreadTuner(explore_every=8)
    ran = _run(monkeypatch, {1: 0.005, 2: 0.020}, 40, tuner)  # a busy neighbour: two threads are slower
    assert ran[:2] == [2, 1]  # each count is measured once first
    later = ran[2:]
    assert later.count(1) > later.count(2) > 0  # one thread wins; two is retried every 8 steps
    assert all(ran[i] == 2 for i in range(2, 40) if i % 8 == 7)
    tuner.restore()
    assert torch.get_num_threads() == 2
    quiet = _run(monkeypatch, {1: 0.010, 2: 0.006}, 24, T.ThreadTuner(explore_every=8))
    assert quiet[2:].count(2) > quiet[2:].count(1)  # quiet machine: both threads


def test_a_load_that_comes_and_goes_is_followed(monkeypatch, two_threads):
    tuner = T.ThreadTuner(explore_every=4)
    _run(monkeypatch, {1: 0.010, 2: 0.005}, 12, tuner)
    assert tuner._choose() == 2
    _run(monkeypatch, {1: 0.010, 2: 0.050}, 12, tuner)  # a neighbour arrives
    assert tuner._choose() == 1
    _run(monkeypatch, {1: 0.010, 2: 0.005}, 24, tuner)  # and leaves: found again by exploring
    assert tuner._choose() == 2


def test_one_configured_thread_never_changes_anything(monkeypatch):
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert set(_run(monkeypatch, {1: 0.01}, 10, T.ThreadTuner())) == {1}
    finally:
        torch.set_num_threads(old)
