"""The `ExpertParallel` handle a training run holds, and `init_expert_parallel` that makes it.

`ExpertParallel` is the process groups of groups.py plus, as methods, what
the training loop calls on them (batch slices, gradients, metrics from
training.py; layout-free state from state.py), so moekit.train needs one
object. All methods are collective: every rank calls them in the same order.

Not here: the logic of those methods (their modules), the transform
(transform.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from . import state, training
from .groups import ProcessGroups, start_process_group


def init_expert_parallel(ep_size: int, timeout_s: float | None = None, backend: str | None = None) -> "ExpertParallel":
    """Process groups for EP x DP = world size, from the torchrun environment (or an initialised default group).

    Every check that can fail here runs before any network call, so a bad
    size or a missing environment raises the same ConfigError on every rank
    instead of hanging. `timeout_s` (default $MOEKIT_DIST_TIMEOUT or 300 s)
    bounds every collective: a rank that stops responding makes the others
    raise ParallelError after it.
    """
    layout, timeout, owns = start_process_group(ep_size, timeout_s, backend)
    return ExpertParallel(layout, timeout, owns_process_group=owns)


class ExpertParallel(ProcessGroups):
    """The process groups of an EP x DP run and the collectives training needs (see the module docstring)."""

    sharded = True  # each rank's model holds its experts only (training.SingleProcess: False)

    def __enter__(self) -> "ExpertParallel":
        return self

    # ------------------------------------------------ data, metrics, gradients (training.py)

    def shard_batch(self, batch: Any) -> Any:
        return training.shard_batch(self, batch)

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return training.mean_metrics(self, metrics)

    def sum_load(self, tracker) -> None:
        training.sum_load(self, tracker)

    def reduce_gradients(self, model: nn.Module) -> None:
        training.reduce_gradients(self, model)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return training.clip_grad_norm_(self, model, max_norm)

    # ------------------------------------------------ layout-free state (state.py)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return state.full_state_dict(self, model)

    def shard_state_dict(self, model: nn.Module, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state.shard_state_dict(self, model, full_state)

    def load_model_state(self, model: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
        state.load_model_state(self, model, full_state)

    def full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return state.full_optimizer_state(self, model, optimizer)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, full_state: dict) -> None:
        state.load_optimizer_state(self, model, optimizer, full_state)

    def broadcast_model(self, model: nn.Module) -> None:
        state.broadcast_model(self, model)
