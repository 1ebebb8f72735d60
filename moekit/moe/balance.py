"""Aux-loss-free load balancing (DeepSeek-V3's expert bias), applied by an optimizer pre-step hook.

A router with `bias_update_rate > 0` counts, in training forwards only, how
many tokens selected each expert (`expert_counts`, before capacity; routing.py).
Before each optimizer step `update_expert_bias` moves every such router's bias
by `bias_update_rate * sign(mean(counts) - counts)` and clears its counts, so
an expert loaded below the mean becomes likelier to be selected and one above
it less (the bias steers selection, never the weights). Under expert
parallelism the counts of all layers, stacked into one tensor, are summed over
the ranks in a single all-reduce, so every rank applies the update one process
would on the whole batch (torchtitan's design). Outside training nothing is
counted and no optimizer steps, so evaluation and generation never move the bias.

`install_bias_balancing(model, optimizer, parallel)` registers the hook where
the optimizer is made (train/loop.py). Not here: how the bias steers the
choice (routing.py), the process groups and their all-reduce (parallel/).

Shape legend: E experts of one layer, S all layers' experts stacked.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .routing import TopKRouter


def balanced_routers(model: nn.Module) -> list[TopKRouter]:
    """The routers of `model` that balance by bias (moe.bias_update_rate > 0), in module order."""
    return [m for m in model.modules() if isinstance(m, TopKRouter) and m.cfg.bias_update_rate > 0]


@torch.no_grad()
def update_expert_bias(routers: list[TopKRouter], parallel: Any = None) -> None:
    """Every router's bias += rate * sign(mean load - load), from the counts since the last step; counts cleared.

    parallel: the run's `ExpertParallel` (or `SingleProcess`); with several ranks the stacked
    counts of all routers are summed over them in one all-reduce.
    """
    if not routers:
        return
    counts_S = torch.cat([r.expert_counts for r in routers])
    if parallel is not None and parallel.world_size > 1:
        parallel.all_reduce(counts_S, what="the expert counts of every MoE layer (aux-loss-free balancing)")
    for router, counts_E in zip(routers, counts_S.split([r.cfg.num_experts for r in routers])):
        load_E = counts_E.float()
        router.expert_bias += router.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
        router.expert_counts.zero_()


def install_bias_balancing(model: nn.Module, optimizer: torch.optim.Optimizer, parallel: Any = None):
    """Register `update_expert_bias` over `model`'s bias-balanced routers as `optimizer`'s step pre-hook.

    Returns the hook's handle (`.remove()` takes it off), or None when no router balances by bias.
    """
    routers = balanced_routers(model)
    if not routers:
        return None
    return optimizer.register_step_pre_hook(lambda opt, args, kwargs: update_expert_bias(routers, parallel))
