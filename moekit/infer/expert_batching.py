"""Expert-aware batching: with every waiting token's experts known (Read-ME routing), pick each step's
batch so that it touches few experts, and age waiting requests so that none starves.

A request is a queue of tokens, each with the experts it will use (a
layer-shared router decides them from the token id, before the model runs);
tokens of a request are served one per step, in order. `step()` returns the
batch: first every request that has waited `max_wait` steps or more (oldest
first), then whole groups of requests whose next token shares an expert set,
largest group first, until `max_batch` is reached. `FifoScheduler` is the
baseline: the longest-waiting requests first.

Guarantees (tested): every request finishes; a request's tokens are served
in order; a request with a pending token waits at most
`max_wait + ceil(A / max_batch)` steps, A the most requests active meanwhile
(once due, only requests that waited longer, at most A - 1, go before it).

The rules themselves are plain functions over `Pending` records
(`fifo_pick`, `expert_aware_pick`), which the server's continuous-batching
`moekit.infer.scheduler.Scheduler` applies to its running rows when the
model routes ahead; `plan_steps` replays a rule over the pending tokens to
give the expert sets of the coming steps (the lookahead cache's window).
Nothing here runs a model or moves weights (offload/, expert_cache.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class Pending:
    """A request with a token ready: how long it has waited (steps), when it arrived, its next token's experts."""

    waited: int
    arrival: int
    experts: tuple[int, ...]


def fifo_pick(pending: list[Pending], max_batch: int) -> list[int]:
    """Indices into `pending` of the longest-waiting requests (ties by arrival)."""
    order = sorted(range(len(pending)), key=lambda i: (-pending[i].waited, pending[i].arrival))
    return order[:max_batch]


def expert_aware_pick(pending: list[Pending], max_batch: int, max_wait: int) -> list[int]:
    """Indices into `pending`: the due ones (waited >= max_wait, oldest first), then by expert group.

    Groups that add no new expert come first, then the biggest groups per new expert.
    """
    by_age = fifo_pick(pending, len(pending))
    chosen = [i for i in by_age if pending[i].waited >= max_wait][:max_batch]
    picked = set(chosen)
    experts_on: set[int] = set().union(*(pending[i].experts for i in chosen)) if chosen else set()
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in by_age:
        if i not in picked:
            groups.setdefault(pending[i].experts, []).append(i)
    order = sorted(groups.items(), key=lambda kv: (len(set(kv[0]) - experts_on) > 0,
                                                   -len(kv[1]) / max(1, len(set(kv[0]) - experts_on))))
    for experts, members in order:
        if len(chosen) >= max_batch:
            break
        chosen.extend(members[: max_batch - len(chosen)])
        experts_on |= set(experts)
    return chosen


def plan_steps(pending: list[Pending], pick, max_steps: int = 64, served_again: bool = False) -> list[list[int]]:
    """The expert sets of the coming steps if `pick(pending) -> indices` served the known tokens in turn.

    Requests served in a step have unknown next tokens: they leave the plan, or with `served_again` come
    back with the same experts (a guess: a request's tokens tend to stay on its experts); the rest wait
    one step more.
    """
    left = list(pending)
    steps = []
    while left and len(steps) < max_steps:
        chosen = set(pick(left))
        if not chosen:
            break
        steps.append(sorted(set().union(*(left[i].experts for i in chosen))))
        again = [Pending(0, p.arrival, p.experts) for i, p in enumerate(left) if i in chosen] if served_again else []
        left = [Pending(p.waited + 1, p.arrival, p.experts) for i, p in enumerate(left) if i not in chosen] + again
    return steps


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
