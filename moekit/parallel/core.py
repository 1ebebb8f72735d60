"""Expert parallelism on torch.distributed: process groups, the all-to-all dispatcher, sharded training.

A run of W processes (started by torchrun; gloo on CPU, NCCL for CUDA tensors)
is laid out as EP x DP = W. Rank r = dp * EP + ep: the EP consecutive ranks
of one EP group (one node's GPUs when EP <= GPUs per node) hold all experts
between them, expert e on EP rank e // (E / EP); the DP copies of one expert
shard form its expert-data-parallel group.

`apply_expert_parallel(model, parallel)` is the transform. On every MoELayer it
keeps only the local experts' weights and swaps the LocalDispatcher for an
`AllToAllDispatcher`; routers, experts, the layer's forward and the Routing
record are unchanged. The dispatcher sends each token to the ranks that own
its experts (a variable-size all-to-all, differentiable: backward is the
reverse all-to-all), hands the experts module only its own experts' tokens,
and sends the results back.

What "equal to one process" means. The global batch is split by rows over
all W ranks (world rank r takes the r-th equal slice) and the sharded run
computes what one process computes on the whole batch:
- capacity and dropping are decided on the global batch: capacity =
  ceil(k * T_global / E * factor) and the kept assignments are exactly those
  LocalDispatcher keeps on the concatenation of all ranks' tokens in rank
  order (also for Random Token Selection, whose priorities are drawn for the
  global batch from the same generator state on every rank);
- the batch balance loss and the aux-loss-free bias update use the global
  expert load (a router hook all-reduces it);
- gradients: parameters outside the experts are averaged over the world;
  expert parameters are summed over their expert-data-parallel group and
  divided by W (each shard already holds the gradient of all tokens of its
  EP group). Optimizer state lives with the shard it belongs to.
Not bitwise single-process: routing noise (jitter, RSample) is drawn per
rank, expert-choice routers choose among each rank's own tokens, and losses
a model computes outside the Routing record (Time-MoE's all-layer balance
loss) are per rank and then averaged.

Checkpoints do not depend on the layout: `full_state_dict` and
`full_optimizer_state` gather the experts into the single-process format that
rank 0 writes; `load_model_state` and `load_optimizer_state` re-shard on load.

Not here: the training loop (train.py takes an `ExpertParallel` and calls the
methods below), the communication model (docs/scaling.md).

Shape legend: T tokens, D hidden, E experts (all), L local experts,
K top-k, N this rank's assignments, M assignments this rank's experts
receive, P EP size, W world size.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..moe.dispatch import LocalDispatcher, capacity_keep_mask, expert_capacity
from ..errors import CheckpointError, ConfigError, MoekitError
from ..moe.layers import MoELayer
from ..moe.routing import Routing

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "MOEKIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


class ParallelError(MoekitError, RuntimeError):
    """A collective with the other ranks failed: a rank exited, crashed or stopped responding."""


# ---------------------------------------------------------------- layout and process groups


@dataclass(frozen=True)
class Layout:
    """Where a rank sits in the EP x DP grid."""

    world_size: int
    ep_size: int
    rank: int

    @property
    def dp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep_size

    def ep_group_ranks(self, dp_rank: int) -> list[int]:
        return list(range(dp_rank * self.ep_size, (dp_rank + 1) * self.ep_size))

    def expert_dp_ranks(self, ep_rank: int) -> list[int]:
        return list(range(ep_rank, self.world_size, self.ep_size))


def check_layout(world_size: int, ep_size: Any) -> None:
    """The EP size must be a positive integer dividing the world size."""
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ConfigError(f"expert_parallel={ep_size!r} is invalid: it must be an integer >= 1")
    if world_size % ep_size:
        raise ConfigError(
            f"the world size {world_size} (processes started by torchrun) is not divisible by the expert-parallel "
            f"size {ep_size}: start a multiple of {ep_size} processes, or choose an EP size that divides {world_size}"
        )


def check_experts(num_experts: int, ep_size: int, where: str = "the MoE layer") -> None:
    """Every EP rank needs the same whole number of experts (at least one)."""
    if num_experts < ep_size:
        raise ConfigError(
            f"expert parallelism over {ep_size} ranks needs at least {ep_size} experts per MoE layer, but {where} has "
            f"{num_experts}: lower the expert-parallel size or raise moe.num_experts"
        )
    if num_experts % ep_size:
        raise ConfigError(
            f"{where} has {num_experts} experts, which do not split evenly over {ep_size} expert-parallel ranks: "
            f"choose an expert-parallel size that divides {num_experts}"
        )


def default_backend() -> str:
    """gloo for CPU tensors, plus NCCL for CUDA tensors when both are present."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def _timeout_s(timeout_s: float | None) -> float:
    if timeout_s is not None:
        value = timeout_s
    else:
        raw = os.environ.get(TIMEOUT_ENV, "")
        try:
            value = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is invalid: it must be a number of seconds > 0") from None
    if not value > 0:
        raise ConfigError(f"the distributed timeout {value!r} is invalid: it must be a number of seconds > 0")
    return float(value)


def _torchrun_env(ep_size: int) -> tuple[int, int]:
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ConfigError(
            f"expert parallelism (size {ep_size}) needs the torchrun environment, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set: launch with "
            f"`torchrun --nproc-per-node {ep_size} -m moekit train --expert-parallel {ep_size} ...`"
        )
    values = {}
    for name in ("RANK", "WORLD_SIZE"):
        try:
            values[name] = int(os.environ[name])
        except ValueError:
            raise ConfigError(f"the torchrun variable {name}={os.environ[name]!r} is not an integer") from None
    world, rank = values["WORLD_SIZE"], values["RANK"]
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"the torchrun variables RANK={rank} and WORLD_SIZE={world} are inconsistent")
    return world, rank


def init_expert_parallel(ep_size: int, timeout_s: float | None = None, backend: str | None = None) -> "ExpertParallel":
    """Process groups for EP x DP = world size, from the torchrun environment (or an initialised default group).

    Every check that can fail here runs before any network call, so a bad
    size or a missing environment raises the same ConfigError on every rank
    instead of hanging. `timeout_s` (default $MOEKIT_DIST_TIMEOUT or 300 s)
    bounds every collective: a rank that stops responding makes the others
    raise ParallelError after it.
    """
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ConfigError(f"expert_parallel={ep_size!r} is invalid: it must be an integer >= 1")
    timeout = _timeout_s(timeout_s)
    owns = not (dist.is_available() and dist.is_initialized())
    if owns:
        world, rank = _torchrun_env(ep_size)
    else:
        world, rank = dist.get_world_size(), dist.get_rank()
    check_layout(world, ep_size)
    if owns:
        if not dist.is_available():
            raise ConfigError("this PyTorch build has no torch.distributed, which expert parallelism needs")
        backend = backend or default_backend()
        if "nccl" in backend:  # one GPU per rank: NCCL must not put every rank on cuda:0
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return ExpertParallel(Layout(world, ep_size, rank), timeout, owns_process_group=owns)


class ExpertParallel:
    """The process groups of an EP x DP run and the collectives training needs.

    Use as a context manager (or call `close()`): a process group this object
    initialised is destroyed at the end. All methods are collective: every
    rank must call them in the same order.
    """

    def __init__(self, layout: Layout, timeout_s: float, owns_process_group: bool = False):
        self.layout = layout
        self.timeout_s = timeout_s
        self.owns_process_group = owns_process_group
        self.ep_group = self._new_groups([layout.ep_group_ranks(d) for d in range(layout.dp_size)], layout.dp_rank)
        self.expert_dp_group = self._new_groups([layout.expert_dp_ranks(e) for e in range(layout.ep_size)], layout.ep_rank)

    def _new_groups(self, groups: list[list[int]], mine: int):
        """Create every group (all ranks must take part in each creation), return this rank's."""
        if len(groups) == 1:
            return dist.group.WORLD
        timeout = datetime.timedelta(seconds=self.timeout_s)
        created = [dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else SINGLE_RANK for ranks in groups]
        return created[mine]

    # ------------------------------------------------ sizes

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def ep_size(self) -> int:
        return self.layout.ep_size

    @property
    def dp_size(self) -> int:
        return self.layout.dp_size

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs and checkpoints."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"ExpertParallel(rank={self.rank}, world={self.world_size}, ep={self.ep_size}, dp={self.dp_size})"

    def __enter__(self) -> "ExpertParallel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False

    # ------------------------------------------------ collectives with clear failures

    def call(self, what: str, fn, *args, **kwargs):
        """Run one collective; a failure (peer gone, timeout) becomes a ParallelError naming `what`."""
        try:
            return fn(*args, **kwargs)
        except ParallelError:
            raise
        except RuntimeError as e:
            lines = str(e).strip().splitlines()
            cause = lines[0][:300] if lines else type(e).__name__
            raise ParallelError(
                f"rank {self.rank} of {self.world_size}: {what} failed because another rank exited, crashed or did not "
                f"respond within the {self.timeout_s:g} s timeout (set {TIMEOUT_ENV} to change it); the first error is in "
                f"that rank's output. Cause: {cause}"
            ) from e

    def all_reduce(self, t: torch.Tensor, group=None, what: str = "an all-reduce", op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In place over `group` (default: the world); returns t."""
        if _group_size(group) > 1:
            self.call(what, dist.all_reduce, t, op=op, group=group)
        return t

    def all_gather(self, t: torch.Tensor, group=None, what: str = "an all-gather") -> list[torch.Tensor]:
        """Equal-shape tensors from every rank of `group` (default: the world), in group-rank order."""
        if _group_size(group) == 1:
            return [t]
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(_group_size(group))]
        self.call(what, dist.all_gather, out, t, group=group)
        return out

    def barrier(self, what: str = "a barrier") -> None:
        if self.world_size > 1:
            self.call(what, dist.barrier)

    # ------------------------------------------------ consistency checks

    def check_same(self, value: Any, what: str = "config") -> None:
        """Raise the same ConfigError on every rank when `value` (JSON-able) differs between ranks."""
        if self.world_size == 1:
            return
        blob = json.dumps(value, sort_keys=True, default=str).encode()
        length = torch.tensor([len(blob)], dtype=torch.int64)
        lengths = [int(n) for n in self.all_gather(length, what=f"comparing the {what} across ranks")]
        padded = torch.zeros(max(lengths), dtype=torch.uint8)
        padded[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        blobs = self.all_gather(padded, what=f"comparing the {what} across ranks")
        texts = [bytes(b[:n].tolist()).decode() for b, n in zip(blobs, lengths)]
        for other, text in enumerate(texts):
            if text != texts[0]:
                keys = _differing_keys(json.loads(texts[0]), json.loads(text))
                shown = ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
                raise ConfigError(
                    f"the ranks were started with different {what}s: rank {other} differs from rank 0 in {shown}; "
                    "start every rank with the same command line and config"
                )

    # ------------------------------------------------ data and metrics

    def shard_batch(self, batch: Any) -> Any:
        """This rank's equal slice (along dim 0) of every tensor in a batch of tensors, tuples, lists and dicts."""
        W, r = self.world_size, self.rank

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

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each plain-number metric averaged over the ranks (every rank holds an equal share of the batch)."""
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        if self.world_size == 1 or not keys:
            return dict(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        self.all_reduce(values, what="averaging the metrics")
        return {**metrics, **{k: float(v) / self.world_size for k, v in zip(keys, values)}}

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        if self.world_size == 1 or not values:
            return list(values)
        t = self.all_reduce(torch.tensor(values, dtype=torch.float64), what="averaging over ranks")
        return [float(v) / self.world_size for v in t]

    def sum_load(self, tracker) -> None:
        """Sum a stats.LoadTracker's per-layer expert counts over the ranks, in place."""
        for layer in sorted(tracker.counts):
            tracker.counts[layer] = self.all_reduce(tracker.counts[layer].clone(), what="summing the expert load")

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank (e.g. a Ctrl-C seen by one process)."""
        if self.world_size == 1:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], dtype=torch.int32)
        return bool(self.all_reduce(t, what="agreeing on a stop request", op=dist.ReduceOp.MAX)[0])

    # ------------------------------------------------ gradients

    def reduce_gradients(self, model: nn.Module) -> None:
        """Gradients of the global mean loss: others averaged over the world, experts over their expert-DP group / W."""
        experts = expert_shards(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        # A rank may hold no gradient where another has one; one process would see a (zero) gradient there.
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
        self.all_reduce(has, what="agreeing which parameters have gradients", op=dist.ReduceOp.MAX)
        for p, h in zip(params, has.tolist()):
            if h and p.grad is None:
                p.grad = torch.zeros_like(p)
        with_grad = [p for p in params if p.grad is not None]
        self._sum_scaled([p for p in with_grad if id(p) not in experts], None, "reducing the gradients")
        self._sum_scaled([p for p in with_grad if id(p) in experts], self.expert_dp_group, "reducing the expert gradients")

    def _sum_scaled(self, params: list[nn.Parameter], group, what: str) -> None:
        """grad = (sum of grad over `group`) / world size, one flat all-reduce per dtype."""
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for dtype in sorted(by_dtype, key=str):
            grads = [p.grad for p in by_dtype[dtype]]
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.all_reduce(flat, group, what)
            flat.div_(self.world_size)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
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
            self.all_reduce(squares, self.ep_group, "summing the expert gradient norms")
            norms = torch.where(is_expert, squares.sqrt(), norms)
        total = torch.linalg.vector_norm(norms, 2)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.detach().mul_(coef.to(p.grad.dtype))
        return total

    # ------------------------------------------------ layout-free state

    def _gather_experts(self, t: torch.Tensor, what: str) -> torch.Tensor:
        return torch.cat(self.all_gather(t.detach(), self.ep_group, what), dim=0)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """model.state_dict() with every expert tensor gathered: the single-process format."""
        state = model.state_dict()
        for key in sharded_state_keys(model):
            state[key] = self._gather_experts(state[key], f"gathering {key}")
        return state

    def shard_state_dict(self, model: nn.Module, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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

    def load_model_state(self, model: nn.Module, full_state: dict[str, torch.Tensor]) -> None:
        """Strictly load a single-process (layout-free) state dict into the sharded model."""
        from ..checkpoints import load_model_state

        load_model_state(model, self.shard_state_dict(model, full_state))

    def full_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """optimizer.state_dict() with the experts' state gathered: what one process would save."""
        sd = optimizer.state_dict()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        experts = expert_shards(model)
        state = {}
        for idx, entry in sd["state"].items():
            p = params[idx]
            if id(p) in experts:  # a new dict: the entries alias the optimizer's live state
                entry = {
                    k: self._gather_experts(v, f"gathering the optimizer state of an expert tensor ({k})")
                    if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                    for k, v in entry.items()
                }
            state[idx] = entry
        return {**sd, "state": state}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, full_state: dict) -> None:
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

    def broadcast_model(self, model: nn.Module) -> None:
        """Make every copy identical: others from world rank 0, expert shards from their DP rank 0."""
        sharded = set(sharded_state_keys(model))
        for key, t in model.state_dict().items():
            if key in sharded:
                if self.dp_size > 1:
                    self.call(f"broadcasting {key}", dist.broadcast, t, src=self.ep_rank, group=self.expert_dp_group)
            elif self.world_size > 1:
                self.call(f"broadcasting {key}", dist.broadcast, t, src=0)


SINGLE_RANK = "single-rank group"  # a group of one rank: its collectives are no-ops (None would mean the world)


def _group_size(group) -> int:
    if group is SINGLE_RANK or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            out += [name] if (k in a) != (k in b) else _differing_keys(a[k], b[k], name)
        return out
    return [] if a == b else [prefix or "the value"]


# ---------------------------------------------------------------- autograd collectives


class _AllToAll(torch.autograd.Function):
    """Variable-size all-to-all over the EP group; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, dispatcher):
        ctx.splits = (send_splits, recv_splits)
        ctx.dispatcher = dispatcher
        return dispatcher._exchange(x, send_splits, recv_splits)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return ctx.dispatcher._exchange(grad, recv_splits, send_splits), None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over the world; the gradient of each rank's input is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, x, parallel, what):
        ctx.parallel, ctx.what = parallel, what
        return parallel.all_reduce(x.detach().clone().contiguous(), what=what)

    @staticmethod
    def backward(ctx, grad):
        return ctx.parallel.all_reduce(grad.clone().contiguous(), what=f"{ctx.what} (backward)"), None, None


# ---------------------------------------------------------------- the dispatcher


@dataclass
class Traffic:
    """What a dispatcher sent to other ranks: hidden-state rows and bytes, and the time in all-to-all."""

    rows_sent: int = 0
    bytes_sent: int = 0
    meta_bytes_sent: int = 0  # the per-expert token counts exchanged before each dispatch
    calls: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        self.rows_sent = self.bytes_sent = self.meta_bytes_sent = self.calls = 0
        self.seconds = 0.0


@dataclass
class _Plan:
    """What combine needs to undo dispatch."""

    order_N: torch.Tensor  # sorted-by-expert -> assignment, on this rank
    regroup_M: torch.Tensor  # received rows -> grouped by local expert
    send_splits: list[int]
    recv_splits: list[int]


class AllToAllDispatcher:
    """Capacity on the global batch; tokens to the ranks owning their experts and back.

    `dispatch` returns the tokens this rank's experts must compute (from every
    rank of the EP group), grouped by local expert, with counts for the local
    experts only, so the layer's `experts(x_ND, counts_E)` call runs unchanged
    on the local weights. `combine` returns this rank's tokens in token order.
    """

    def __init__(self, parallel: ExpertParallel, num_experts: int, name: str = "MoE layer"):
        check_experts(num_experts, parallel.ep_size, name)
        self.parallel = parallel
        self.num_experts = num_experts
        self.num_local = num_experts // parallel.ep_size
        self.first_local = parallel.ep_rank * self.num_local
        self.name = name
        self.sharded: list[str] = []  # names in the experts module's state that hold local experts only
        self.traffic = Traffic()
        self._local = LocalDispatcher()

    # ------------------------------------------------ capacity on the global batch

    def limit(
        self,
        routing: Routing,
        top_k: int,
        factor: float,
        min_capacity: int = 0,
        policy: str = "position",
        generator: torch.Generator | None = None,
    ) -> Routing:
        """Keep what LocalDispatcher.limit keeps on the concatenation of all ranks' tokens."""
        if factor <= 0:
            return routing
        if self.parallel.world_size == 1:
            return self._local.limit(routing, top_k, factor, min_capacity, policy, generator)
        if policy == "random":
            keep_N = self._random_keep(routing, top_k, factor, min_capacity, generator)
        else:
            keep_N = self._position_keep(routing, top_k, factor, min_capacity)
        return routing.without(keep_N)

    def _position_keep(self, routing: Routing, top_k: int, factor: float, min_capacity: int) -> torch.Tensor:
        """First choices before second ones, earlier global tokens first, from per-(expert, slot) counts only."""
        E, T, N = self.num_experts, routing.num_tokens, routing.expert_idx_N.numel()
        device = routing.expert_idx_N.device
        K = max(N // T, 1) if T else top_k
        slot_N = torch.arange(N, device=device) % K
        cell_N = routing.expert_idx_N * K + slot_N  # (expert, slot)
        mine = torch.zeros(E * K + 1, dtype=torch.int64, device=device)
        mine[: E * K] = torch.bincount(cell_N, minlength=E * K)
        mine[-1] = T
        all_WC = torch.stack(self.parallel.all_gather(mine, what=f"the capacity count of {self.name}"))
        capacity = expert_capacity(int(all_WC[:, -1].sum()), top_k, E, factor, min_capacity)
        counts_WEK = all_WC[:, : E * K].view(-1, E, K)
        total_EK = counts_WEK.sum(0)
        # ahead of (e, s) on this rank: every earlier slot of e, then slot s of e on lower ranks
        offset_EK = total_EK.cumsum(1) - total_EK + counts_WEK[: self.parallel.rank].sum(0)
        order = cell_N.argsort(stable=True)  # stable: token order inside each cell
        starts = mine[: E * K].cumsum(0) - mine[: E * K]
        pos_N = torch.empty(N, dtype=torch.int64, device=device)
        pos_N[order] = torch.arange(N, device=device) - starts[cell_N[order]]
        return offset_EK.reshape(-1)[cell_N] + pos_N < capacity

    def _random_keep(self, routing, top_k, factor, min_capacity, generator) -> torch.Tensor:
        """Random Token Selection on the global batch: gather every assignment, rank them, keep ours."""
        device = routing.expert_idx_N.device
        N, T = routing.expert_idx_N.numel(), routing.num_tokens
        what = f"the capacity exchange of {self.name}"
        sizes = self.parallel.all_gather(torch.tensor([N, T], dtype=torch.int64, device=device), what=what)
        n_max = max(int(s[0]) for s in sizes)
        mine = torch.full((2, n_max), -1, dtype=torch.int64, device=device)
        mine[0, :N], mine[1, :N] = routing.expert_idx_N, routing.token_idx_N
        gathered = self.parallel.all_gather(mine, what=what)
        experts, tokens, start, offset = [], [], 0, 0
        for r, (size, g) in enumerate(zip(sizes, gathered)):
            n, t = int(size[0]), int(size[1])
            if r == self.parallel.rank:
                start = sum(int(s[0]) for s in sizes[:r])
            experts.append(g[0, :n])
            tokens.append(g[1, :n] + offset)
            offset += t
        merged = Routing(
            token_idx_N=torch.cat(tokens), expert_idx_N=torch.cat(experts), weight_N=torch.empty(0),
            num_tokens=offset, num_experts=self.num_experts, logits_TE=torch.empty(0), probs_TE=torch.empty(0),
        )
        capacity = expert_capacity(offset, top_k, self.num_experts, factor, min_capacity)
        return capacity_keep_mask(merged, capacity, "random", generator)[start : start + N]

    # ------------------------------------------------ moving tokens

    def run(self, x_TD: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
        """The MoE layer's one call: tokens to their experts' ranks, the local experts, results back."""
        x_MD, counts_L, plan = self.dispatch(x_TD, routing)
        return self.combine(experts(x_MD, counts_L), routing, plan)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        """(x_MD grouped by local expert, counts for the local experts, plan for combine)."""
        if self.parallel.ep_size == 1:
            return self._local.dispatch(x_TD, routing)
        P, L = self.parallel.ep_size, self.num_local
        x_ND, counts_E, order_N = self._local.dispatch(x_TD, routing)
        counts_PL = counts_E.view(P, L)
        recv_PL = torch.empty_like(counts_PL)
        self._count_meta(counts_PL)
        self.parallel.call(
            f"the token-count exchange of {self.name}", dist.all_to_all_single, recv_PL, counts_PL.contiguous(),
            group=self.parallel.ep_group,
        )
        send_splits, recv_splits = counts_PL.sum(1).tolist(), recv_PL.sum(1).tolist()
        x_MD = _AllToAll.apply(x_ND, send_splits, recv_splits, self)
        # received: [from rank 0: local expert 0, 1, ...][from rank 1: ...]; the experts want it by expert
        local_M = torch.repeat_interleave(torch.arange(L, device=x_TD.device).repeat(P), recv_PL.reshape(-1))
        regroup_M = local_M.argsort(stable=True)
        return x_MD[regroup_M], recv_PL.sum(0), _Plan(order_N, regroup_M, send_splits, recv_splits)

    def combine(self, y_MD: torch.Tensor, routing: Routing, plan) -> torch.Tensor:
        """Results back to the ranks their tokens came from, then the weighted sum in token order."""
        if self.parallel.ep_size == 1:
            return self._local.combine(y_MD, routing, plan)
        inverse_M = torch.empty_like(plan.regroup_M)
        inverse_M[plan.regroup_M] = torch.arange(plan.regroup_M.numel(), device=plan.regroup_M.device)
        y_ND = _AllToAll.apply(y_MD[inverse_M], plan.recv_splits, plan.send_splits, self)
        return self._local.combine(y_ND, routing, plan.order_N)

    def _exchange(self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        start = time.perf_counter()
        self.parallel.call(
            f"the all-to-all of {self.name}", dist.all_to_all_single, out, x, recv_splits, send_splits,
            group=self.parallel.ep_group,
        )
        rows = sum(send_splits) - send_splits[self.parallel.ep_rank]
        self.traffic.seconds += time.perf_counter() - start
        self.traffic.calls += 1
        self.traffic.rows_sent += rows
        self.traffic.bytes_sent += rows * _row_numel(x) * x.element_size()
        return out

    def _count_meta(self, counts_PL: torch.Tensor) -> None:
        self.traffic.meta_bytes_sent += (self.parallel.ep_size - 1) * self.num_local * counts_PL.element_size()


def _row_numel(x: torch.Tensor) -> int:
    n = 1
    for s in x.shape[1:]:
        n *= s
    return n


# ---------------------------------------------------------------- the transform


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def expert_shards(model: nn.Module) -> dict[int, AllToAllDispatcher]:
    """id(parameter) -> the dispatcher of its layer, for every sharded expert parameter."""
    out = {}
    for _, layer in moe_layers(model):
        d = layer.dispatcher
        if isinstance(d, AllToAllDispatcher):
            for name in d.sharded:
                t = getattr(layer.experts, name)
                if isinstance(t, nn.Parameter):
                    out[id(t)] = d
    return out


def sharded_state_keys(model: nn.Module) -> dict[str, AllToAllDispatcher]:
    """state_dict key -> dispatcher, for every tensor that holds only this rank's experts."""
    out = {}
    for name, layer in moe_layers(model):
        d = layer.dispatcher
        if isinstance(d, AllToAllDispatcher):
            prefix = f"{name}.experts." if name else "experts."
            persistent = set(layer.experts.state_dict())
            out.update({prefix + t: d for t in d.sharded if t in persistent})
    return out


def apply_expert_parallel(model: nn.Module, parallel: ExpertParallel) -> nn.Module:
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
    parallel.broadcast_model(model)
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


def _global_router_stats(router: nn.Module, parallel: ExpertParallel, name: str) -> None:
    """Router hooks: the batch balance loss and the balancing-bias update from the global expert load."""
    cfg = getattr(router, "cfg", None)
    if cfg is None or cfg.router == "expert_choice" or parallel.world_size == 1:
        return
    batch_balance = cfg.balance_loss == "batch"
    bias = cfg.bias_update_rate > 0 and hasattr(router, "expert_bias")
    if not (batch_balance or bias):
        return
    saved: dict[str, torch.Tensor] = {}

    def before(module, args):
        if bias and module.training:
            saved["bias"] = module.expert_bias.detach().clone()  # the update is redone from the global load

    def after(module, args, routing: Routing):
        if routing.selected_E is None:
            return routing
        stats = torch.cat([routing.selected_E.double(), torch.tensor([float(routing.num_tokens)], dtype=torch.float64,
                                                                      device=routing.selected_E.device)])
        parallel.all_reduce(stats, what=f"the router statistics of {name}")
        load_E, T = stats[:-1], max(float(stats[-1]), 1.0)
        aux = dict(routing.aux_losses)
        if batch_balance and "balance" in aux:
            probs_TE = routing.probs_TE
            P_E = _AllReduceSum.apply(probs_TE.sum(0), parallel, f"the balance loss of {name}") / T
            aux["balance"] = cfg.num_experts * ((load_E.to(probs_TE.dtype) / T) * P_E).sum()
        if "bias" in saved:
            load = load_E.float()
            with torch.no_grad():
                module.expert_bias.copy_(saved.pop("bias") + cfg.bias_update_rate * torch.sign(load.mean() - load))
        return replace(routing, aux_losses=aux)

    router.register_forward_pre_hook(before)
    router.register_forward_hook(after)
