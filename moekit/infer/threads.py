"""Decode-time thread count that adapts to contention: `ThreadTuner`, measured per step.

A decode step's threads meet at barriers (torch's intra-op pool, the native kernels' jobs); when another
process takes one of the cores, every step waits for the thread that lost its core, and two threads can
decode slower than one. The tuner times each decode step at the thread count it ran, keeps a moving
average of the step time per count (1 and the configured count), runs the faster one, and tries the
other every `explore_every` steps, so it follows the load as it comes and goes. The native kernels take
their own limit from torch.get_num_threads(), so one setting governs both.

Not here: the kernels' own per-call choice below this limit (moekit/moe/_qdot.c), the decode loop
(engine.py).
"""

from __future__ import annotations

import time

import torch


class ThreadTuner:
    """Picks the thread count of each decode step from the measured step times (1 or `threads`)."""

    def __init__(self, threads: int | None = None, explore_every: int = 24, decay: float = 0.7):
        self.max = threads or torch.get_num_threads()
        self.counts = sorted({1, self.max})
        self.explore_every, self.decay = explore_every, decay
        self.step_s: dict[int, float] = {}
        self.steps, self.current, self._t0 = 0, self.max, 0.0

    def before(self) -> None:
        """Sets the thread count for the next step and starts its clock."""
        self.current = self._choose()
        if torch.get_num_threads() != self.current:
            torch.set_num_threads(self.current)
        self._t0 = time.perf_counter()

    def after(self) -> None:
        """Records the step's time at the count it ran."""
        dt = time.perf_counter() - self._t0
        old = self.step_s.get(self.current)
        self.step_s[self.current] = dt if old is None else self.decay * old + (1 - self.decay) * dt
        self.steps += 1

    def restore(self) -> None:
        if torch.get_num_threads() != self.max:
            torch.set_num_threads(self.max)

    def _choose(self) -> int:
        if len(self.counts) == 1:
            return self.counts[0]
        untried = [c for c in self.counts if c not in self.step_s]
        if untried:
            return untried[-1]
        best = min(self.counts, key=lambda c: (self.step_s[c], -c))
        if self.steps % self.explore_every == self.explore_every - 1:
            return next(c for c in self.counts if c != best)
        return best
