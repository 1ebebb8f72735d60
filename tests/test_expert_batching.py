"""Expert-aware batching invariants: every request finishes, order kept, bounded waiting, fewer experts per step.

The library holds the rules (`fifo_pick`, `expert_aware_pick` over `Pending` records), which the server's
scheduler applies; `FifoScheduler` / `ExpertAwareScheduler` here are a small simulator that serves queues
of tokens (each with its experts) with those rules, one step at a time, so the guarantees can be checked.
"""

import math
import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from moekit.errors import ConfigError
from moekit.infer.expert_batching import Pending, expert_aware_pick, fifo_pick


@dataclass
class _Request:
    rid: object
    arrival: int
    tokens: deque = field(default_factory=deque)  # (token index, experts tuple)
    next_index: int = 0
    last_served: int = -1
    closed: bool = False

    def waited(self, now: int) -> int:
        return now - max(self.last_served + 1, self.arrival)


class FifoScheduler:
    """Requests with a pending token, longest waiting first (ties by arrival)."""

    def __init__(self, max_batch: int, max_wait: int = 0):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch={max_batch!r} is invalid: it must be an integer >= 1")
        if not isinstance(max_wait, int) or max_wait < 0:
            raise ConfigError(f"max_wait={max_wait!r} is invalid: it must be an integer >= 0")
        self.max_batch, self.max_wait = max_batch, max_wait
        self.now = 0
        self.requests: dict[object, _Request] = {}
        self.finished: list = []

    def submit(self, rid, experts_per_token=(), close: bool = True) -> None:
        """A new request, with the experts of its known tokens; close=False: more tokens come by `push`."""
        if rid in self.requests:
            raise ConfigError(f"request {rid!r} was already submitted")
        self.requests[rid] = _Request(rid, self.now)
        for experts in experts_per_token:
            self.push(rid, experts)
        self.requests[rid].closed = close
        self._retire(self.requests[rid])

    def push(self, rid, experts) -> None:
        req = self.requests[rid]
        experts = tuple(sorted({int(e) for e in (experts if isinstance(experts, (tuple, list, set)) else [experts])}))
        req.tokens.append((req.next_index, experts))
        req.next_index += 1

    def close(self, rid) -> None:
        self.requests[rid].closed = True
        self._retire(self.requests[rid])

    @property
    def done(self) -> bool:
        return not self.requests

    def _ready(self) -> list[_Request]:
        return [r for r in self.requests.values() if r.tokens]

    def _pending(self, ready: list[_Request]) -> list[Pending]:
        return [Pending(r.waited(self.now), r.arrival, r.tokens[0][1]) for r in ready]

    def _choose(self, ready: list[_Request]) -> list[_Request]:
        return [ready[i] for i in fifo_pick(self._pending(ready), self.max_batch)]

    def step(self) -> list[tuple[object, int, tuple[int, ...]]]:
        """One step's batch: (request id, token index, experts) per served token."""
        chosen = self._choose(self._ready())
        batch = []
        for r in chosen:
            index, experts = r.tokens.popleft()
            r.last_served = self.now
            batch.append((r.rid, index, experts))
            self._retire(r)
        self.now += 1
        return batch

    def _retire(self, r: _Request) -> None:
        if r.closed and not r.tokens:
            self.finished.append(r.rid)
            del self.requests[r.rid]


class ExpertAwareScheduler(FifoScheduler):
    """Due requests first, then requests grouped by their next token's experts, biggest group first."""

    def __init__(self, max_batch: int, max_wait: int = 8):
        super().__init__(max_batch, max_wait)

    def _choose(self, ready: list[_Request]) -> list[_Request]:
        return [ready[i] for i in expert_aware_pick(self._pending(ready), self.max_batch, self.max_wait)]


def workload(n=40, experts=8, seed=0, skew=True):
    rng = random.Random(seed)
    reqs = {}
    for i in range(n):
        length = rng.randint(1, 30)
        # a request tends to stay on few experts (Read-ME routes correlate with the text's domain)
        home = rng.randrange(experts)
        reqs[i] = [home if skew and rng.random() < 0.7 else rng.randrange(experts) for _ in range(length)]
    return reqs


def run(sched, reqs, arrivals_per_step=5):
    pending = list(reqs.items())
    served = {rid: [] for rid in reqs}
    waits, last = {rid: 0 for rid in reqs}, {}
    arrived, longest, peak, experts_touched, steps = {}, 0, 0, [], 0
    while pending or not sched.done:
        for rid, toks in pending[:arrivals_per_step]:
            sched.submit(rid, toks)
            arrived[rid] = sched.now
        pending = pending[arrivals_per_step:]
        peak = max(peak, len(sched.requests))
        for rid, r in sched.requests.items():  # how long each waiting request has gone unserved
            longest = max(longest, r.waited(sched.now))
        batch = sched.step()
        assert len(batch) <= sched.max_batch and len({b[0] for b in batch}) == len(batch)
        experts_touched.append(len({e for _, _, ex in batch for e in ex}))
        for rid, index, experts in batch:
            served[rid].append((index, experts))
        steps += 1
        assert steps < 10_000
    # the bound: max_wait plus one pass over everyone active at the busiest time
    return served, longest - math.ceil(peak / sched.max_batch), experts_touched


@pytest.mark.parametrize("cls", [FifoScheduler, ExpertAwareScheduler])
def test_every_request_finishes_in_order(cls):
    reqs = workload()
    sched = cls(max_batch=6, max_wait=4)
    served, max_gap, _ = run(sched, reqs)
    assert sorted(sched.finished) == sorted(reqs)
    for rid, toks in reqs.items():
        assert [i for i, _ in served[rid]] == list(range(len(toks)))  # in order, each once
        assert [e for _, (e,) in served[rid]] == toks


@pytest.mark.parametrize("max_wait", [0, 3, 10])
def test_no_starvation_beyond_the_aging_bound(max_wait):
    reqs = workload(n=60, seed=1)
    _, max_gap, _ = run(ExpertAwareScheduler(max_batch=4, max_wait=max_wait), reqs)
    assert max_gap <= max_wait


def test_a_lone_request_on_a_rare_expert_is_served_within_the_bound():
    sched = ExpertAwareScheduler(max_batch=2, max_wait=3)
    sched.submit("rare", [7] * 3)
    for i in range(6):
        sched.submit(i, [0] * 50)  # a crowd on expert 0 that alone would fill every batch
    steps_until = []
    while "rare" in sched.requests:
        if any(rid == "rare" for rid, _, _ in sched.step()):
            steps_until.append(sched.now)
    gaps = [b - a for a, b in zip([0] + steps_until, steps_until)]
    assert max(gaps) <= 3 + math.ceil(7 / 2)


def test_expert_aware_touches_fewer_experts_than_fifo():
    reqs = workload(n=60, seed=2)
    _, _, fifo = run(FifoScheduler(max_batch=8), reqs)
    _, _, aware = run(ExpertAwareScheduler(max_batch=8, max_wait=16), reqs)
    assert sum(aware) < 0.8 * sum(fifo)


def test_streamed_tokens_and_bad_settings():
    sched = ExpertAwareScheduler(max_batch=2, max_wait=1)
    sched.submit("a", [1], close=False)
    assert sched.step() == [("a", 0, (1,))]
    assert sched.step() == [] and not sched.done  # open, nothing pending
    sched.push("a", (2, 3))
    sched.close("a")
    assert sched.step() == [("a", 1, (2, 3))] and sched.done
    with pytest.raises(ConfigError, match="max_batch"):
        ExpertAwareScheduler(max_batch=0)
