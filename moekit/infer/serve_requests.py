"""What the scheduler holds per request: the submitted `Request`, its running `Row`, and the refusals.

A `Request` is what a caller submits (prompt ids, its own `SamplingConfig`,
an optional group id, an event callback); the scheduler turns it into a
`Row` while it runs (sequence bookkeeping, generator, penalties, next token
and position, and, for known routes, its own router cache and next experts).

Not here: the loop that runs them (scheduler.py), sampling rules (sampling.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import MoekitError
from .sampling import Penalties, SamplingConfig
from .sequence import SequenceState

# on_event(kind, payload): ("token", (token_id, new_text)) for each token, then ("done", Completion)
# or ("error", message). Called from the scheduler's thread.
EventCallback = Callable[[str, object], None]


class QueueFullError(MoekitError):
    """The scheduler's waiting queue is full; try again later."""


class ShuttingDownError(MoekitError):
    """The scheduler no longer accepts requests."""


@dataclass
class Request:
    """One generation request: prompt ids, its own settings, and where its events go."""

    prompt_ids: list[int]
    cfg: SamplingConfig
    on_event: EventCallback = lambda kind, payload: None
    group_id: int | None = None  # the routers' group (task, modality) of every token; None: the model's token ranges
    cancelled: bool = False
    finish_reason: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None  # set by ServeStats: time to first token, inter-token latency
    tokens: int = 0

    def cancel(self) -> None:
        """Ask the scheduler to drop this request (its slot is freed before the next step)."""
        self.cancelled = True


class Row:
    """A running request: its sequence bookkeeping, generator, next input token and position."""

    def __init__(self, request: Request, seq: SequenceState, generator, budget: int) -> None:
        self.request, self.seq, self.generator, self.budget = request, seq, generator, budget
        self.penalties = Penalties(request.cfg, [request.prompt_ids]) if request.cfg.penalized else None
        self.next_token = 0
        self.emitted = 0  # characters of seq.text sent as "token" events
        self.position = len(request.prompt_ids)
        self.router_cache = None  # known routes: this row's own cache of the model's router
        self.experts: tuple[int, ...] = ()  # known routes: the experts of next_token
        self.arrival = self.ready_at = 0  # decode steps: when it joined, since when it has waited


__all__ = ["Request", "Row", "QueueFullError", "ShuttingDownError", "EventCallback"]
