"""Expert-aware batching invariants: every request finishes, order kept, bounded waiting, fewer experts per step."""

import math
import random

import pytest

from moekit.errors import ConfigError
from moekit.infer.expert_batching import ExpertAwareScheduler, FifoScheduler


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
