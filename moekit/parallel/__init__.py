"""Expert parallelism on torch.distributed: sharded MoE training that computes what one process computes.

A run of W processes (torchrun; gloo on CPU, NCCL for CUDA tensors) is laid
out as EP x DP = W. `init_expert_parallel(ep_size)` makes the process groups
(an `ExpertParallel`); `apply_expert_parallel(model, parallel)` keeps each
rank's experts and swaps every MoELayer's dispatcher for the all-to-all one;
the training loop (moekit.train) then calls the handle's methods to split
batches, reduce gradients and save layout-free checkpoints.

What "equal to one process" means: the global batch is split by rows over all
W ranks, capacity and dropping are decided on the global batch, the batch
balance loss and bias update use the global expert load, and gradients equal
those of one process on the whole batch (details in the modules and
docs/scaling.md).

Modules: groups (layout, torchrun start-up, timeouts, ParallelError, failing-
clearly collectives), collectives (differentiable all-to-all and all-reduce),
dispatcher (AllToAllDispatcher, traffic counts, which tensors are sharded),
training (batch slices, gradients, metrics; SingleProcess, the one-process stand-in), state (gather / re-shard
checkpoints), transform (apply_expert_parallel), expert_parallel (the
ExpertParallel handle, init_expert_parallel).

This file holds no code, only the public names.
"""

from .dispatcher import AllToAllDispatcher, Traffic, expert_shards, moe_layers, sharded_state_keys
from .expert_parallel import ExpertParallel, init_expert_parallel
from .groups import (
    DEFAULT_TIMEOUT_S,
    TIMEOUT_ENV,
    Layout,
    ParallelError,
    ProcessGroups,
    check_experts,
    check_layout,
    default_backend,
)
from .training import SingleProcess
from .transform import apply_expert_parallel

__all__ = [
    "AllToAllDispatcher", "DEFAULT_TIMEOUT_S", "ExpertParallel", "Layout", "ParallelError", "ProcessGroups", "SingleProcess",
    "TIMEOUT_ENV", "Traffic", "apply_expert_parallel", "check_experts", "check_layout", "default_backend",
    "expert_shards", "init_expert_parallel", "moe_layers", "sharded_state_keys",
]
