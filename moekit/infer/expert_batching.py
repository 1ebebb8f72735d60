"""Expert-aware batching: with every waiting token's experts known (Read-ME routing), pick each step's
batch so that it touches few experts, and age waiting requests so that none starves.

A request is a queue of tokens, each with the experts it will use (a
layer-shared router decides them from the token id, before the model runs);
tokens of a request are served one per step, in order. A step's batch is:
first every request that has waited `max_wait` steps or more (oldest
first), then whole groups of requests whose next token shares an expert set,
largest group first, until `max_batch` is reached. `fifo_pick` is the
baseline: the longest-waiting requests first.

Guarantees (tested in tests/test_expert_batching.py, whose small simulator
serves queues of tokens with these rules): every request finishes; a
request's tokens are served in order; a request with a pending token waits at
most `max_wait + ceil(A / max_batch)` steps, A the most requests active
meanwhile (once due, only requests that waited longer, at most A - 1, go
before it).

The rules themselves are plain functions over `Pending` records
(`fifo_pick`, `expert_aware_pick`), which the server's continuous-batching
`moekit.infer.scheduler.Scheduler` applies to its running rows when the
model routes ahead; `plan_steps` replays a rule over the pending tokens to
give the expert sets of the coming steps (the lookahead cache's window).
Nothing here runs a model or moves weights (offload/, expert_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass


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
