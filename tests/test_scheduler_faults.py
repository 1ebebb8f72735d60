"""A fault inside the scheduler fails exactly the requests it touches; the others get their solo tokens.

Faults are injected into the model's forward (for one request's prefill, for one request's decode step)
and into one row's sampling; each time the faulty request gets exactly one "error" event ("internal
error: ...") and no "done", its row is freed, and every other request gets the tokens
`Engine.generate_ids` gives it alone (the oracle). A failure outside any forward (the step's own
bookkeeping) fails what is running and queued, and the background thread serves the next request.
"""

import logging
import threading

import pytest
import torch

import moekit.infer.scheduler as scheduler_module
from moekit.infer import SamplingConfig
from moekit.infer.scheduler import Request, Scheduler

from test_scheduler import tiny_engine

pytestmark = pytest.mark.usefixtures("one_thread")
MARK = 250  # a prompt starting with this token is the faulty one


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


class Faulty:
    """The real model, raising for the forward passes `when(ids, kwargs)` picks."""

    def __init__(self, real, when) -> None:
        self.real, self.when, self.cfg = real, when, real.cfg

    def __call__(self, ids, **kw):
        if self.when(ids, kw):
            raise RuntimeError("injected fault")
        return self.real(ids, **kw)


def run(sched, prompts, cfgs):
    events = {i: [] for i in range(len(prompts))}
    for i, (p, c) in enumerate(zip(prompts, cfgs)):
        sched.submit(Request(list(p), c, lambda kind, payload, i=i: events[i].append((kind, payload))))
    sched.run_until_idle()
    return events


def check(engine, events, prompts, cfgs, faulty):
    for i, (p, c) in enumerate(zip(prompts, cfgs)):
        kinds = [k for k, _ in events[i]]
        if i == faulty:
            assert kinds.count("error") == 1 and "done" not in kinds and kinds[-1] == "error"
            assert events[i][-1][1] == "internal error: RuntimeError: injected fault"
        else:
            assert kinds.count("done") == 1 and "error" not in kinds
            want = engine.generate_ids([p], c)[0]
            assert events[i][-1][1].token_ids == want.token_ids


PROMPTS = [[10, 11, 12], [MARK, 1, 2, 3, 4, 5, 6, 7], [20, 21, 22, 23]]
CFGS = [SamplingConfig(max_new_tokens=6, stop_token_ids=[]), SamplingConfig(max_new_tokens=8, stop_token_ids=[]),
        SamplingConfig(max_new_tokens=6, stop_token_ids=[])]


def test_a_fault_in_one_requests_prefill_fails_it_alone(engine, caplog):
    sched = Scheduler(engine, max_batch=4)
    sched.model = Faulty(sched.model, lambda ids, kw: ids.shape[1] > 1 and bool((ids == MARK).any()))
    with caplog.at_level(logging.ERROR, logger="moekit.scheduler"):
        events = run(sched, PROMPTS, CFGS)  # the three are prefilled together: the group fails, each is retried alone
    check(engine, events, PROMPTS, CFGS, faulty=1)
    assert any(r.exc_info and "injected fault" in str(r.exc_info[1]) for r in caplog.records)  # the traceback is logged
    assert not sched.rows and sched.cursor == 0
    again = run(sched, [PROMPTS[0]], [CFGS[0]])  # and the scheduler goes on
    check(engine, again, [PROMPTS[0]], [CFGS[0]], faulty=None)


def test_a_fault_in_a_decode_step_fails_only_the_row_that_fails_alone(engine):
    # B's decode inputs sit at positions 8..14, A's at 3..7, C's at 4..8: position 11 is B's alone
    sched = Scheduler(engine, max_batch=4)
    sched.model = Faulty(sched.model, lambda ids, kw: ids.shape[1] == 1 and bool((kw["positions_BT"] == 11).any()))
    events = run(sched, PROMPTS, CFGS)
    check(engine, events, PROMPTS, CFGS, faulty=1)
    # B had streamed 4 tokens (the prefill's, then decode inputs at 8, 9, 10) before the fault
    assert [k for k, _ in events[1]].count("token") == 4


def test_a_fault_in_one_rows_sampling_fails_that_row_alone(engine, monkeypatch):
    real, calls = scheduler_module.next_tokens, []

    def next_tokens(logits, cfg, generator, penalties):
        if cfg.seed == 99:
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected fault")
        return real(logits, cfg, generator, penalties)

    monkeypatch.setattr(scheduler_module, "next_tokens", next_tokens)
    cfgs = [CFGS[0], SamplingConfig(max_new_tokens=8, temperature=1.0, seed=99, stop_token_ids=[]), CFGS[2]]
    events = run(Scheduler(engine, max_batch=4), PROMPTS, cfgs)
    check(engine, events, PROMPTS, cfgs, faulty=1)


def test_a_failure_outside_any_forward_fails_the_step_and_the_thread_serves_on(engine, monkeypatch):
    sched = Scheduler(engine, max_batch=4)
    real, broken = sched._admit, [True]

    def admit():
        if broken.pop() if broken else False:
            raise RuntimeError("injected fault")
        real()

    sched._admit = admit
    got = {}
    finished = threading.Event()

    def listener(name):
        def on_event(kind, payload):
            if kind in ("done", "error"):
                got[name] = (kind, payload)
                if len(got) == 2:
                    finished.set()
        return on_event

    sched.submit(Request([10, 11, 12], CFGS[0], listener("first")))
    sched.start()
    try:
        wait = threading.Event()
        for _ in range(200):
            if "first" in got:
                break
            wait.wait(0.05)
        sched.submit(Request([10, 11, 12], CFGS[0], listener("second")))
        assert finished.wait(30)
    finally:
        sched.shutdown(timeout=1.0)
    assert got["first"] == ("error", "internal error: RuntimeError: injected fault")
    assert got["second"][0] == "done"
    assert got["second"][1].token_ids == engine.generate_ids([[10, 11, 12]], CFGS[0])[0].token_ids


def test_rows_that_fail_leave_the_cache_rows_of_the_others_intact(engine):
    """Many faulty and healthy requests interleaved through max_batch=2 (rows move, the axis compacts)."""
    prompts = [[MARK, 5] if i % 2 else [30 + i, 31, 32, 33, 34][: 2 + i % 4] for i in range(8)]
    cfgs = [SamplingConfig(max_new_tokens=3 + i, stop_token_ids=[]) for i in range(8)]
    sched = Scheduler(engine, max_batch=2)
    sched.model = Faulty(sched.model, lambda ids, kw: ids.shape[1] > 1 and bool((ids == MARK).any()))
    events = run(sched, prompts, cfgs)
    for i in range(8):
        kinds = [k for k, _ in events[i]]
        if i % 2:
            assert kinds == ["error"]
        else:
            assert kinds[-1] == "done" and events[i][-1][1].token_ids == engine.generate_ids([prompts[i]], cfgs[i])[0].token_ids
    assert torch.equal(sched.valid, torch.zeros_like(sched.valid)) and not sched.rows
