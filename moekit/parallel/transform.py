"""The expert-parallel transform: `apply_expert_parallel(model, parallel)` shards a built model's experts.

On every MoELayer it keeps only the local experts' weights and swaps the
LocalDispatcher for an `AllToAllDispatcher`; routers, experts, the layer's
forward and the Routing record are unchanged. A router hook makes the batch
balance loss use the global expert load (an all-reduce), so it equals one
process on the whole batch; the aux-loss-free bias is updated from the
global counts by the optimizer pre-step hook (moe/balance.py). Not bitwise
single-process: routing noise (jitter, RSample) is drawn per rank,
expert-choice routers choose among each rank's own tokens, and losses a model
computes outside the Routing record (Time-MoE's all-layer balance loss) are
per rank and then averaged.

Not here: the dispatcher (dispatcher.py), the process groups (groups.py), the
training-step collectives (training.py), checkpoint gathering (state.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..moe.routing import Routing
from .collectives import AllReduceSum
from .dispatcher import AllToAllDispatcher, moe_layers
from .groups import ProcessGroups, check_experts
from .state import broadcast_model


def apply_expert_parallel(model: nn.Module, parallel: ProcessGroups) -> nn.Module:
    """Shard every MoE layer's experts over the EP group and route tokens with all-to-all; returns `model`.

    Call on the built model on every rank (same config, same seed), before the
    optimizer is made. Rank 0's weights are broadcast so all copies start equal.
    """
    layers = moe_layers(model)
    if not layers:
        raise ConfigError("the model has no MoE layer, so there are no experts to shard: expert parallelism needs ffn=moe or residual_moe")
    for name, layer in layers:
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            raise ConfigError(f"expert parallelism is already applied to {name or 'the model'}")
        check_experts(layer.experts.num_experts, parallel.ep_size, f"MoE layer {name!r}" if name else "the MoE layer")
    signature = [[k, list(v.shape), str(v.dtype)] for k, v in model.state_dict().items()]
    parallel.check_same(signature, "model")
    for name, layer in layers:
        dispatcher = AllToAllDispatcher(parallel, layer.experts.num_experts, f"MoE layer {name!r}" if name else "the MoE layer")
        _shard_experts(layer.experts, dispatcher)
        layer.dispatcher = dispatcher
        _global_router_stats(layer.router, parallel, dispatcher.name)
    broadcast_model(parallel, model)
    return model


def _shard_experts(experts: nn.Module, d: AllToAllDispatcher) -> None:
    """Keep this rank's slice of every parameter and buffer stacked by expert."""
    lo, hi = d.first_local, d.first_local + d.num_local
    for name, p in list(experts.named_parameters(recurse=False)):
        if p.dim() and p.shape[0] == d.num_experts:
            setattr(experts, name, nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad))
            d.sharded.append(name)
    for name, b in list(experts.named_buffers(recurse=False)):
        if b is not None and b.dim() and b.shape[0] == d.num_experts:
            setattr(experts, name, b[lo:hi].clone())
            d.sharded.append(name)


def _global_router_stats(router: nn.Module, parallel: ProcessGroups, name: str) -> None:
    """A router hook: the batch balance loss from the global expert load (the bias: moe/balance.py's step hook)."""
    cfg = getattr(router, "cfg", None)
    if cfg is None or cfg.router == "expert_choice" or parallel.world_size == 1 or cfg.balance_loss != "batch":
        return

    def after(module, args, routing: Routing):
        if routing.selected_E is None or "balance" not in routing.aux_losses:
            return routing
        stats = torch.cat([routing.selected_E.double(), torch.tensor([float(routing.num_tokens)], dtype=torch.float64,
                                                                      device=routing.selected_E.device)])
        parallel.all_reduce(stats, what=f"the router statistics of {name}")
        load_E, T = stats[:-1], max(float(stats[-1]), 1.0)
        probs_TE = routing.probs_TE
        P_E = AllReduceSum.apply(probs_TE.sum(0), parallel, f"the balance loss of {name}") / T
        aux = {**routing.aux_losses, "balance": cfg.num_experts * ((load_E.to(probs_TE.dtype) / T) * P_E).sum()}
        return replace(routing, aux_losses=aux)

    router.register_forward_hook(after)
