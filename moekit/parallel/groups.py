"""Expert-parallel process groups: the EP x DP layout, torchrun start-up, timeouts, collectives that fail clearly.

A run of W processes (started by torchrun; gloo on CPU, NCCL for CUDA tensors)
is laid out as EP x DP = W. Rank r = dp * EP + ep: the EP consecutive ranks
of one EP group (one node's GPUs when EP <= GPUs per node) hold all experts
between them, expert e on EP rank e // (E / EP); the DP copies of one expert
shard form its expert-data-parallel group.

Holds `Layout`, the checks that run before any network call (`check_layout`,
`check_experts`, the torchrun environment, the timeout), `start_process_group`
and `ProcessGroups`: the groups plus all-reduce / all-gather / barrier /
cross-rank checks that turn a dead or silent peer into a `ParallelError`.

Not here: the differentiable all-to-all (collectives.py), the dispatcher
(dispatcher.py), state gathering (state.py), gradients and batches
(training.py), the `ExpertParallel` handle and `init_expert_parallel`
(expert_parallel.py).
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError, MoekitError

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


def start_process_group(ep_size: int, timeout_s: float | None = None, backend: str | None = None) -> tuple[Layout, float, bool]:
    """(layout, timeout in s, whether this call initialised the default group), from torchrun's environment.

    Every check that can fail here runs before any network call, so a bad
    size or a missing environment raises the same ConfigError on every rank
    instead of hanging. An already initialised default group is reused.
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
    return Layout(world, ep_size, rank), timeout, owns


class ProcessGroups:
    """The process groups of an EP x DP run and the collectives on them, each failing with a clear ParallelError.

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
    def device(self) -> torch.device:
        """This rank's training device: its own GPU (cuda:LOCAL_RANK) when the process group has NCCL, else the CPU."""
        if torch.cuda.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend()).lower():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs and checkpoints."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world={self.world_size}, ep={self.ep_size}, dp={self.dp_size})"

    def __enter__(self) -> "ProcessGroups":
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

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        if self.world_size == 1 or not values:
            return list(values)
        t = self.all_reduce(torch.tensor(values, dtype=torch.float64), what="averaging over ranks")
        return [float(v) / self.world_size for v in t]

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank (e.g. a Ctrl-C seen by one process)."""
        if self.world_size == 1:
            return bool(flag)
        t = torch.tensor([int(bool(flag))], dtype=torch.int32)
        return bool(self.all_reduce(t, what="agreeing on a stop request", op=dist.ReduceOp.MAX)[0])


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
