"""Expert cache: LRU/LFU/LFRU victims, Belady is optimal (checked by brute force), protection and pins, bad input."""

import functools
import random

import pytest

from moekit.errors import MoekitError
from moekit.infer.expert_cache import (
    LFRU, LFU, LRU, POLICIES, Belady, CacheError, ExpertCache, LookaheadBelady, RouteWindow, RoutingTrace, build_policy,
    Policy,
)


def simulate_misses(trace_steps: list[list[int]], num_experts: int, num_slots: int, policy: Policy) -> int:
    """Demand misses of `policy` replaying one layer's trace (no prefetching)."""
    cache = ExpertCache(num_experts, num_slots, policy)
    misses = 0
    for experts in trace_steps:
        cache.begin_step(experts)
        for e in experts:
            if e not in cache:
                misses += 1
                if cache.place(e) is None:
                    raise CacheError(f"{len(experts)} experts in one step do not fit {num_slots} slots")
        cache.end_step()
    return misses


def run(cache: ExpertCache, steps):
    misses = []
    for experts in steps:
        cache.begin_step(experts)
        for e in experts:
            if e not in cache:
                misses.append(e)
                cache.place(e)
        cache.end_step()
    return misses


def test_lru_evicts_least_recently_used():
    cache = ExpertCache(8, 2, LRU())
    run(cache, [[0], [1], [0]])
    run(cache, [[2]])  # 1 is the least recent
    assert cache.resident == [0, 2]


def test_lfu_keeps_history_and_breaks_ties_by_recency():
    cache = ExpertCache(8, 2, LFU())
    run(cache, [[0], [0], [0], [1], [2]])  # 1 and 2 used once: 1 older -> evicted for 2
    assert cache.resident == [0, 2]
    run(cache, [[1], [1], [3]])  # 1 returns (count 3 now); 3 evicts the less used of {0: 3, 1: 3}: 0 is older
    assert cache.resident == [1, 3]


def test_lfru_decays_old_frequency():
    cache = ExpertCache(8, 2, LFRU(half_life=1.0))
    run(cache, [[0]] * 4 + [[1]] * 6)  # 0 used often but long ago; 1 recent
    run(cache, [[2]])
    assert cache.resident == [1, 2]
    with pytest.raises(CacheError, match="half_life"):
        LFRU(half_life=0)


def test_belady_evicts_farthest_next_use():
    steps = [[0], [1], [2], [0], [1]]
    cache = ExpertCache(4, 2, Belady(steps))
    assert run(cache, steps) == [0, 1, 2, 1]  # at step 2, 1 is used later than 0: evict 1


@functools.lru_cache(maxsize=None)
def _optimal(steps: tuple, slots: int, state: frozenset = frozenset(), t: int = 0) -> int:
    """Minimum misses over all eviction choices (exhaustive), for tiny traces."""
    if t == len(steps):
        return 0
    need = set(steps[t])
    missing = need - state
    keep = state & need
    others = sorted(state - need)
    room = slots - len(need)
    best = None
    from itertools import combinations

    for kept in combinations(others, min(room, len(others))):
        cost = _optimal(steps, slots, frozenset(keep | missing | set(kept)), t + 1)
        best = cost if best is None else min(best, cost)
    return len(missing) + best


def test_belady_matches_the_brute_force_optimum_and_beats_online_policies():
    rng = random.Random(0)
    for trial in range(25):
        E, slots, k = 6, rng.choice([2, 3, 4]), rng.choice([1, 2])
        skew = [rng.random() ** 3 for _ in range(E)]
        steps = [sorted(set(rng.choices(range(E), weights=skew, k=k))) for _ in range(14)]
        belady = simulate_misses(steps, E, slots, Belady(steps))
        assert belady == _optimal(tuple(map(tuple, steps)), slots), (steps, slots)
        for policy in (LRU(), LFU(), LFRU()):
            assert simulate_misses(steps, E, slots, policy) >= belady


def test_pinned_and_protected_experts_are_not_evicted():
    cache = ExpertCache(8, 3, LRU())
    run(cache, [[0, 1, 2]])
    cache.protect([0])  # prefetched for the coming step
    slot, evicted = cache.place(5, demand=False)
    assert evicted == 1 and 0 in cache
    cache.protect([5])
    assert cache.place(6, keep={2}, demand=False) is None  # everything else protected or kept: no prefetch room
    cache.begin_step([2])  # the step uses only 2: a demand fetch may evict a protected expert it does not use
    slot, evicted = cache.place(7, keep={2, 7})
    assert evicted in (0, 5) and 2 in cache
    cache.end_step()
    assert cache.protected == set() and cache.pinned == set()


def test_trace_round_trip_and_belady_checks_the_trace(tmp_path):
    trace = RoutingTrace()
    for experts in ([1, 0], [2]):
        trace.record(0, experts)
    path = trace.save(tmp_path / "trace.json")
    loaded = RoutingTrace.load(path)
    assert loaded.steps == [[[0, 1], [2]]]
    cache = ExpertCache(4, 2, build_policy("belady", 0, loaded))
    cache.begin_step([0, 1])
    cache.end_step()
    with pytest.raises(CacheError, match="does not match this generation at MoE layer 0, step 1"):
        cache.begin_step([3])
    cache2 = ExpertCache(4, 2, build_policy("belady", 0, loaded))
    run(cache2, [[0, 1], [2]])
    with pytest.raises(CacheError, match="has 2 steps"):
        cache2.begin_step([0])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CacheError, match="not a moekit routing trace"):
        RoutingTrace.load(tmp_path / "bad.json")


def test_unknown_policy_lists_the_accepted_ones():
    with pytest.raises(MoekitError, match="unknown cache policy 'fifo': accepted policies are lru, lfu, lfru, belady, lookahead"):
        build_policy("fifo")
    with pytest.raises(CacheError, match="needs a routing trace"):
        build_policy("belady")
    assert POLICIES == ("lru", "lfu", "lfru", "belady", "lookahead")
    with pytest.raises(CacheError, match="at least 1"):
        ExpertCache(4, 0, LRU())


def _farthest_next_use_misses(steps, slots):
    """Belady written out plainly: on a miss with no free slot, evict the resident expert (not needed now)
    whose next use is farthest (never: first; ties by smallest id)."""
    resident, misses = set(), 0
    for t, experts in enumerate(steps):
        for e in experts:
            if e in resident:
                continue
            misses += 1
            if len(resident) == slots:
                def next_use(x):
                    return next((u for u in range(t + 1, len(steps)) if x in steps[u]), len(steps) + 1)
                resident.remove(max((x for x in resident if x not in experts), key=lambda x: (next_use(x), -x)))
            resident.add(e)
    return misses


def test_lookahead_with_the_whole_future_known_is_the_brute_force_optimum():
    rng = random.Random(3)
    for trial in range(25):
        E, slots, k = 6, rng.choice([2, 3, 4]), rng.choice([1, 2])
        skew = [rng.random() ** 3 for _ in range(E)]
        steps = [sorted(set(rng.choices(range(E), weights=skew, k=k))) for _ in range(14)]
        routes = RouteWindow()
        routes.plan(steps)
        misses = simulate_misses(steps, E, slots, LookaheadBelady(routes))
        assert misses == _optimal(tuple(map(tuple, steps)), slots) == _farthest_next_use_misses(steps, slots), (steps, slots)
        assert misses <= simulate_misses(steps, E, slots, LRU())


def test_lookahead_over_a_sliding_window_beats_lru_and_without_a_window_is_lru():
    rng = random.Random(5)
    E, slots, window = 16, 4, 6
    steps = [sorted(set(rng.choices(range(E), weights=[1 + (e % 4 == 0) * 6 for e in range(E)], k=2))) for _ in range(400)]
    routes = RouteWindow()
    cache = ExpertCache(E, slots, LookaheadBelady(routes))
    sliding = 0
    for t, experts in enumerate(steps):
        routes.plan(steps[t : t + window])  # what a server knows before each step
        cache.begin_step(experts)
        for e in experts:
            if e not in cache:
                sliding += 1
                cache.place(e)
        cache.end_step()
    lru = simulate_misses(steps, E, slots, LRU())
    assert sliding < 0.9 * lru
    assert sliding >= simulate_misses(steps, E, slots, Belady(steps))  # never below the optimum
    assert simulate_misses(steps, E, slots, LookaheadBelady()) == lru  # nothing known ahead: least recently used


def test_route_window_anchors_at_the_first_step_after_a_plan():
    routes = RouteWindow()
    routes.plan([[1], [2, 3], [1]])
    routes.begin(10, [1])
    routes.begin(10, [1])  # the next layer of the same forward
    assert routes.next_use(1, 10) == 10 and routes.next_use(1, 11) == 12 and routes.next_use(3, 10) == 11
    assert routes.next_use(4, 10) == float("inf") and routes.experts_at(11) == [2, 3] and routes.experts_at(13) is None
    routes.plan([])
    routes.begin(11, [5])
    assert routes.experts_at(11) == [5] and routes.experts_at(12) is None  # no plan: only the current demand
    assert isinstance(build_policy("lookahead", routes=routes), LookaheadBelady)
