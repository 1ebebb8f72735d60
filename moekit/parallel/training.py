"""What a training step needs from an expert-parallel run: batch slices, gradient reduction and clipping, metrics.

The global batch is split by rows over all W ranks (world rank r takes the
r-th equal slice). Gradients: parameters outside the experts are averaged over
the world; expert parameters are summed over their expert-data-parallel group
and divided by W (each shard already holds the gradient of all tokens of its
EP group), so the step equals one process on the whole batch. Every function
takes the run's process groups (`parallel`) and is collective.

`SingleProcess` is the one-process stand-in with the same attributes and
methods the training loop calls on `ExpertParallel` (rank 0 of 1, identity
slices, no reductions, plain state dicts), so the loop has one path.

Not here: the training loop (moekit.train calls these through
`ExpertParallel` or `SingleProcess`), the optimizer state (state.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoints import load_model_state
from ..errors import ConfigError
from .dispatcher import expert_shards
from .groups import ProcessGroups


def shard_batch(parallel: ProcessGroups, batch: Any) -> Any:
    """This rank's equal slice (along dim 0) of every tensor in a batch of tensors, tuples, lists and dicts."""
    W, r = parallel.world_size, parallel.rank

    def cut(x):
        if isinstance(x, torch.Tensor):
            if x.dim() == 0:
                return x
            n = x.shape[0]
            if n % W:
                raise ConfigError(
                    f"a batch of {n} rows cannot be split evenly over {W} ranks: make the batch size "
                    f"(train.batch_size) a multiple of {W}"
                )
            return x[r * (n // W) : (r + 1) * (n // W)]
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)(*(cut(v) for v in x))
        if isinstance(x, (tuple, list)):
            return type(x)(cut(v) for v in x)
        return x

    return cut(batch)


def mean_metrics(parallel: ProcessGroups, metrics: dict[str, float]) -> dict[str, float]:
    """Each plain-number metric averaged over the ranks (every rank holds an equal share of the batch)."""
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    if parallel.world_size == 1 or not keys:
        return dict(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    parallel.all_reduce(values, what="averaging the metrics")
    return {**metrics, **{k: float(v) / parallel.world_size for k, v in zip(keys, values)}}


def sum_load(parallel: ProcessGroups, tracker) -> None:
    """Sum a stats.LoadTracker's per-layer expert counts over the ranks, in place."""
    for layer in sorted(tracker.counts):
        tracker.counts[layer] = parallel.all_reduce(tracker.counts[layer].clone(), what="summing the expert load")


def reduce_gradients(parallel: ProcessGroups, model: nn.Module) -> None:
    """Gradients of the global mean loss: others averaged over the world, experts over their expert-DP group / W."""
    experts = expert_shards(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    # A rank may hold no gradient where another has one; one process would see a (zero) gradient there.
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    parallel.all_reduce(has, what="agreeing which parameters have gradients", op=dist.ReduceOp.MAX)
    for p, h in zip(params, has.tolist()):
        if h and p.grad is None:
            p.grad = torch.zeros_like(p)
    with_grad = [p for p in params if p.grad is not None]
    _sum_scaled(parallel, [p for p in with_grad if id(p) not in experts], None, "reducing the gradients")
    _sum_scaled(parallel, [p for p in with_grad if id(p) in experts], parallel.expert_dp_group, "reducing the expert gradients")


def _sum_scaled(parallel: ProcessGroups, params: list[nn.Parameter], group, what: str) -> None:
    """grad = (sum of grad over `group`) / world size, one flat all-reduce per dtype."""
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for dtype in sorted(by_dtype, key=str):
        grads = [p.grad for p in by_dtype[dtype]]
        flat = torch.cat([g.reshape(-1) for g in grads])
        parallel.all_reduce(flat, group, what)
        flat.div_(parallel.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm_(parallel: ProcessGroups, model: nn.Module, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the full (unsharded) model; returns the total norm."""
    experts = expert_shards(model)
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    norms = torch.stack([torch.linalg.vector_norm(p.grad.detach(), 2).float() for p in params])
    is_expert = torch.tensor([id(p) in experts for p in params])
    if is_expert.any():
        # a sharded tensor's norm is the root of the sum of its shards' squared norms
        squares = torch.where(is_expert, norms.square(), torch.zeros_like(norms))
        parallel.all_reduce(squares, parallel.ep_group, "summing the expert gradient norms")
        norms = torch.where(is_expert, squares.sqrt(), norms)
    total = torch.linalg.vector_norm(norms, 2)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.detach().mul_(coef.to(p.grad.dtype))
    return total


class SingleProcess:
    """One process training alone: what `ExpertParallel` offers the loop, as identities and no-ops.

    Rank 0 of a world of 1, the main process, experts not sharded; the device
    is the current CUDA device when there is one, else the CPU.
    """

    rank, world_size, ep_size, dp_size, ep_rank = 0, 1, 1, 1, 0
    is_main = True
    sharded = False  # the model holds every expert (ExpertParallel: True)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def __repr__(self) -> str:
        return "SingleProcess()"

    def __enter__(self) -> "SingleProcess":
        return self

    def __exit__(self, *exc) -> None:
        pass

    # ------------------------------------------------ what ExpertParallel does over the ranks, for one rank

    def shard_batch(self, batch: Any) -> Any:
        return batch

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return dict(metrics)

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        return list(values)

    def any_rank(self, flag: bool) -> bool:
        return bool(flag)

    def check_same(self, value: Any, what: str = "config") -> None:
        pass

    def sum_load(self, tracker) -> None:
        pass

    def reduce_gradients(self, model: nn.Module) -> None:
        pass

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_model_state(self, model: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
        load_model_state(model, full_state)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, full_state: dict) -> None:
        optimizer.load_state_dict(full_state)
