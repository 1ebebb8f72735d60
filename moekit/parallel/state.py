"""Layout-free state of an expert-parallel model: gather the experts to save, re-shard them on load.

Checkpoints do not depend on the layout: `full_state_dict` and
`full_optimizer_state` gather the experts into the single-process format that
rank 0 writes; `load_model_state` and `load_optimizer_state` keep this rank's
experts of a single-process state on load; `broadcast_model` makes every copy
start equal. Every function takes the run's process groups (`parallel`) and
is collective: all ranks call it in the same order.

Not here: writing and reading checkpoint files (moekit.checkpoints, the
training loop), which tensors are sharded (dispatcher.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoints import load_model_state as _load_strict
from ..errors import CheckpointError
from .dispatcher import expert_shards, sharded_state_keys
from .groups import ProcessGroups


def _gather_experts(parallel: ProcessGroups, t: torch.Tensor, what: str) -> torch.Tensor:
    return torch.cat(parallel.all_gather(t.detach(), parallel.ep_group, what), dim=0)


def full_state_dict(parallel: ProcessGroups, model: nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every expert tensor gathered: the single-process format."""
    state = model.state_dict()
    for key in sharded_state_keys(model):
        state[key] = _gather_experts(parallel, state[key], f"gathering {key}")
    return state


def shard_state_dict(parallel: ProcessGroups, model: nn.Module, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's part of a single-process state dict."""
    state = dict(full_state)
    for key, d in sharded_state_keys(model).items():
        if key not in state:
            continue  # load_model_state names what is missing
        t = state[key]
        if t.dim() == 0 or t.shape[0] != d.num_experts:
            raise CheckpointError(
                f"tensor {key!r} holds {t.shape[0] if t.dim() else 0} experts in the checkpoint but the model has "
                f"{d.num_experts} (was the checkpoint saved with another config?)"
            )
        state[key] = t[d.first_local : d.first_local + d.num_local]
    return state


def load_model_state(parallel: ProcessGroups, model: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
    """Strictly load a single-process (layout-free) state dict into the sharded model."""
    _load_strict(model, shard_state_dict(parallel, model, full_state))


def full_optimizer_state(parallel: ProcessGroups, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with the experts' state gathered: what one process would save."""
    sd = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    experts = expert_shards(model)
    state = {}
    for idx, entry in sd["state"].items():
        p = params[idx]
        if id(p) in experts:  # a new dict: the entries alias the optimizer's live state
            entry = {
                k: _gather_experts(parallel, v, f"gathering the optimizer state of an expert tensor ({k})")
                if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                for k, v in entry.items()
            }
        state[idx] = entry
    return {**sd, "state": state}


def load_optimizer_state(parallel: ProcessGroups, model: nn.Module, optimizer: torch.optim.Optimizer, full_state: dict) -> None:
    """Load a single-process optimizer state, keeping this rank's expert shards."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    experts = expert_shards(model)
    state = {}
    for idx, entry in full_state.get("state", {}).items():
        p = params[idx] if isinstance(idx, int) and 0 <= idx < len(params) else None
        d = experts.get(id(p)) if p is not None else None
        if d is not None:
            entry = {
                k: v[d.first_local : d.first_local + d.num_local]
                if isinstance(v, torch.Tensor) and v.dim() == p.dim() and v.shape[0] == d.num_experts
                and v.shape[1:] == p.shape[1:] else v
                for k, v in entry.items()
            }
        state[idx] = entry
    optimizer.load_state_dict({**full_state, "state": state})


def broadcast_model(parallel: ProcessGroups, model: nn.Module) -> None:
    """Make every copy identical: others from world rank 0, expert shards from their DP rank 0."""
    sharded = set(sharded_state_keys(model))
    for key, t in model.state_dict().items():
        if key in sharded:
            if parallel.dp_size > 1:
                parallel.call(f"broadcasting {key}", dist.broadcast, t, src=parallel.ep_rank, group=parallel.expert_dp_group)
        elif parallel.world_size > 1:
            parallel.call(f"broadcasting {key}", dist.broadcast, t, src=0)
