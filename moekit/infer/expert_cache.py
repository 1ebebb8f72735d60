"""The per-layer expert cache: which experts sit in the fast slots, and who is evicted next.

One `ExpertCache` per MoE layer owns a fixed number of fast slots. It maps
experts to slots, keeps the experts the current step computes with pinned,
protects prefetched experts from eviction until the step they were fetched
for is over, and asks a replacement `Policy` for a victim when a slot is
needed. Policies, chosen by name:

- `lru`: least recently used;
- `lfu`: least frequently used (counts kept for every expert, resident or
  not, so a returning expert keeps its history; ties go to the least recent);
- `lfru`: least frequently *and* recently used: each use adds 1 to a score
  that halves every `half_life` steps of the layer (the combined
  recency-frequency value of LRFU, Lee et al. 2001), evict the lowest;
- `belady`: the offline optimum (Belady's MIN): evict the expert whose next
  use is farthest in the future, read from a `RoutingTrace` recorded on an
  earlier run of the same generation. For on-demand fetching no policy has
  fewer misses, so it is the bound every other policy is reported against.
- `lookahead`: Belady over the routes known ahead (`RouteWindow`): with a
  layer-shared router (Read-ME's decoupled router) every pending token's
  expert is known before the step, and the server plans its next steps
  (moekit.infer.scheduler); evict the expert whose next planned use is
  farthest, experts outside the window first, least recently used among
  them. One window serves every layer, so each layer's cache makes the same
  choice: the caching unit is the expert across all layers. With the whole
  future in the window it is Belady.

Time is counted in steps of the layer (one forward pass of that layer).
This file knows nothing about where weights live or how they move
(offload.py) or what is predicted (prefetch.py).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoekitError

POLICIES = ("lru", "lfu", "lfru", "belady", "lookahead")


class CacheError(MoekitError, ValueError):
    """A cache policy, trace or budget that cannot be used."""


# ---------------------------------------------------------------- routing trace


@dataclass
class RoutingTrace:
    """Which experts each MoE layer used at each of its steps: steps[layer][step] = sorted expert ids."""

    steps: list[list[list[int]]] = field(default_factory=list)

    def record(self, layer: int, experts) -> None:
        while len(self.steps) <= layer:
            self.steps.append([])
        self.steps[layer].append(sorted(int(e) for e in experts))

    def layer(self, layer: int) -> list[list[int]]:
        return self.steps[layer] if layer < len(self.steps) else []

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps({"format": "moekit.routing_trace", "steps": self.steps}))
        return p

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CacheError(f"routing trace {p} cannot be read: {e}") from None
        if not isinstance(data, dict) or data.get("format") != "moekit.routing_trace":
            raise CacheError(f"{p} is not a moekit routing trace (written by RoutingTrace.save)")
        return cls(steps=data["steps"])


# ---------------------------------------------------------------- policies


class Policy:
    """Chooses which expert leaves a full cache. Times are the layer's step counter."""

    name = "base"

    def on_use(self, expert: int, time: int) -> None:
        """The layer computed with `expert` at step `time`."""

    def on_insert(self, expert: int, time: int) -> None:
        """`expert` was brought into a slot (on demand or by a prefetch)."""

    def on_step_end(self, time: int) -> None:
        """The layer finished step `time`."""

    def check_step(self, experts: list[int], time: int) -> None:
        """Called with the experts a step demands before any eviction of that step."""

    def victim(self, candidates: list[int], time: int) -> int:
        raise NotImplementedError


class LRU(Policy):
    name = "lru"

    def __init__(self) -> None:
        self.last: dict[int, int] = {}

    def on_use(self, expert, time):
        self.last[expert] = time

    def on_insert(self, expert, time):
        self.last[expert] = time

    def victim(self, candidates, time):
        return min(candidates, key=lambda e: (self.last.get(e, -1), e))


class LFU(Policy):
    name = "lfu"

    def __init__(self) -> None:
        self.count: dict[int, int] = {}
        self.last: dict[int, int] = {}

    def on_use(self, expert, time):
        self.count[expert] = self.count.get(expert, 0) + 1
        self.last[expert] = time

    def on_insert(self, expert, time):
        self.last.setdefault(expert, time)

    def victim(self, candidates, time):
        return min(candidates, key=lambda e: (self.count.get(e, 0), self.last.get(e, -1), e))


class LFRU(Policy):
    """Combined recency-frequency: score = sum over past uses of 2^(-(now - t_use) / half_life)."""

    name = "lfru"

    def __init__(self, half_life: float = 8.0) -> None:
        if not half_life > 0:
            raise CacheError(f"lfru half_life={half_life} is invalid: it must be > 0")
        self.half_life = half_life
        self.score: dict[int, tuple[float, int]] = {}  # expert -> (score at time t, t)
        self.last: dict[int, int] = {}

    def _score(self, expert: int, time: int) -> float:
        value, t = self.score.get(expert, (0.0, time))
        return value * 2.0 ** (-(time - t) / self.half_life)

    def on_use(self, expert, time):
        self.score[expert] = (self._score(expert, time) + 1.0, time)
        self.last[expert] = time

    def on_insert(self, expert, time):
        self.last.setdefault(expert, time)

    def victim(self, candidates, time):
        return min(candidates, key=lambda e: (self._score(e, time), self.last.get(e, -1), e))


class Belady(Policy):
    """Evict the expert used farthest in the future (never used again: first), from a recorded trace."""

    name = "belady"

    def __init__(self, trace_steps: list[list[int]], layer: int = 0) -> None:
        self.layer = layer
        self.trace = trace_steps
        self.uses: dict[int, list[int]] = {}
        for step, experts in enumerate(trace_steps):
            for e in experts:
                self.uses.setdefault(int(e), []).append(step)

    def next_use(self, expert: int, time: int) -> float:
        steps = self.uses.get(expert, [])
        i = bisect.bisect_left(steps, time)
        return steps[i] if i < len(steps) else float("inf")

    def check_step(self, experts, time):
        if time >= len(self.trace):
            raise CacheError(
                f"the routing trace for Belady has {len(self.trace)} steps for MoE layer {self.layer}, but the "
                f"generation ran step {time}: record the trace on the same prompt and settings"
            )
        if sorted(experts) != list(self.trace[time]):
            raise CacheError(
                f"the routing trace for Belady does not match this generation at MoE layer {self.layer}, step {time} "
                f"(trace: {list(self.trace[time])}, now: {sorted(experts)}): record it on the same prompt and settings"
            )

    def victim(self, candidates, time):
        return max(candidates, key=lambda e: (self.next_use(e, time), e))


class RouteWindow:
    """The experts of the coming model steps, known ahead (a layer-shared router), for every layer at once.

    `plan(steps)`: steps[0] holds the experts of the next forward pass, steps[1] of the one after, ...
    (a server writes it before each step). The offloader calls `begin(time, demand)` when a layer starts
    a step (all layers of one forward share `time`); the first call after a plan anchors it there.
    Without a plan the window knows only the current step's demand (every layer's, for a layer-shared router).
    """

    def __init__(self, slots: int | None = None) -> None:
        self.slots = slots  # the fewest fast slots of a layer (a prefetch of more experts would evict needed ones)
        self.plan([])
        self.now: int | None = None
        self.current: list[int] | None = None

    def plan(self, steps) -> None:
        self.steps = [sorted({int(e) for e in s}) for s in steps]
        self.origin: int | None = None
        self.uses: dict[int, list[int]] = {}
        for i, experts in enumerate(self.steps):
            for e in experts:
                self.uses.setdefault(e, []).append(i)

    def begin(self, time: int, demand=None) -> None:
        if self.origin is None and self.steps:
            self.origin = time
        if time != self.now:
            self.now, self.current = time, None
        if demand is not None and self.current is None:
            self.current = sorted(int(e) for e in demand)

    def experts_at(self, time: int) -> list[int] | None:
        """The experts step `time` will use, when known."""
        if self.origin is not None and 0 <= time - self.origin < len(self.steps):
            return list(self.steps[time - self.origin])
        return list(self.current) if time == self.now and self.current is not None else None

    def next_use(self, expert: int, time: int) -> float:
        """The first step >= `time` the window says uses `expert`; inf when not in the window."""
        if self.origin is None:
            return float("inf")
        steps = self.uses.get(expert, [])
        i = bisect.bisect_left(steps, time - self.origin)
        return self.origin + steps[i] if i < len(steps) else float("inf")


class LookaheadBelady(Policy):
    """Belady over a `RouteWindow`: farthest next known use first; unknown ones first of all, by LRU."""

    name = "lookahead"

    def __init__(self, routes: RouteWindow | None = None) -> None:
        self.routes = routes if routes is not None else RouteWindow()
        self.last: dict[int, int] = {}

    def check_step(self, experts, time):
        self.routes.begin(time, experts)

    def on_use(self, expert, time):
        self.last[expert] = time

    def on_insert(self, expert, time):
        self.last[expert] = time

    def victim(self, candidates, time):
        return max(candidates, key=lambda e: (self.routes.next_use(e, time), -self.last.get(e, -1), -e))


def build_policy(name: str, layer: int = 0, trace: RoutingTrace | None = None, routes: RouteWindow | None = None,
                 **options) -> Policy:
    """A policy by name; `belady` needs the routing trace of the run it will replay, `lookahead` reads `routes`."""
    if name not in POLICIES:
        raise CacheError(f"unknown cache policy {name!r}: accepted policies are {', '.join(POLICIES)}")
    if name == "belady":
        if trace is None:
            raise CacheError("the belady policy needs a routing trace recorded on the same generation")
        return Belady(trace.layer(layer), layer)
    if name == "lfru":
        return LFRU(**options)
    if name == "lookahead":
        return LookaheadBelady(routes)
    return {"lru": LRU, "lfu": LFU}[name]()


# ---------------------------------------------------------------- the cache


class ExpertCache:
    """A fixed number of fast slots for one MoE layer's experts.

    Slot states: free, or holding an expert (possibly still being loaded; the
    caller keeps the transfer handle). `pinned` experts are computed with in
    the current step; `protected` experts were prefetched for the coming step.
    Neither is evicted, except that a demand fetch may evict a protected
    expert the step turned out not to need.
    """

    def __init__(self, num_experts: int, num_slots: int, policy: Policy, layer: int = 0) -> None:
        if num_slots < 1:
            raise CacheError(f"MoE layer {layer} got {num_slots} fast slots; it needs at least 1")
        self.layer = layer
        self.num_experts = num_experts
        self.num_slots = num_slots
        self.policy = policy
        self.slot_of: dict[int, int] = {}
        self.expert_in: list[int | None] = [None] * num_slots
        self.pinned: set[int] = set()
        self.protected: set[int] = set()
        self.time = 0

    def __contains__(self, expert: int) -> bool:
        return expert in self.slot_of

    @property
    def resident(self) -> list[int]:
        return sorted(self.slot_of)

    def begin_step(self, experts: list[int]) -> None:
        """A step will compute with `experts`: pin them and tell the policy they are used."""
        self.policy.check_step(list(experts), self.time)
        self.pinned = set(experts)
        for e in experts:
            self.policy.on_use(e, self.time)

    def end_step(self) -> None:
        """The step is over: unpin, and lift the protection of the experts prefetched for it."""
        self.pinned = set()
        self.protected = set()
        self.policy.on_step_end(self.time)
        self.time += 1

    def protect(self, experts) -> None:
        self.protected.update(e for e in experts if e in self.slot_of)

    def evictable(self, keep: set[int] = frozenset(), allow_protected: bool = False) -> list[int]:
        """Resident experts that may leave now, never the pinned ones or those in `keep`."""
        blocked = self.pinned | keep | (set() if allow_protected else self.protected)
        return [e for e in self.slot_of if e not in blocked]

    def place(self, expert: int, keep: set[int] = frozenset(), demand: bool = True) -> tuple[int, int | None] | None:
        """A slot for `expert`: (slot, evicted expert or None); None when nothing may be evicted.

        A demand fetch may, as a last resort, evict a protected expert the
        current step does not use; a prefetch never does.
        """
        if expert in self.slot_of:
            raise RuntimeError(f"expert {expert} is already cached in layer {self.layer}")
        slot, evicted = self._free_slot(), None
        if slot is None:
            candidates = self.evictable(keep)
            if not candidates and demand:
                candidates = self.evictable(keep, allow_protected=True)
            if not candidates:
                return None
            evicted = self.policy.victim(candidates, self.time)
            slot = self.slot_of.pop(evicted)
            self.protected.discard(evicted)
        self.slot_of[expert] = slot
        self.expert_in[slot] = expert
        self.policy.on_insert(expert, self.time)
        return slot, evicted

    def drop(self, expert: int) -> None:
        """Forget `expert` (its transfer failed): the slot becomes free."""
        slot = self.slot_of.pop(expert, None)
        if slot is not None:
            self.expert_in[slot] = None
        self.protected.discard(expert)

    def _free_slot(self) -> int | None:
        for s, e in enumerate(self.expert_in):
            if e is None:
                return s
        return None
