"""The expert-parallel dispatcher: capacity on the global batch, tokens to their experts' ranks and back.

`AllToAllDispatcher.run(x_TD, routing, experts)` is the one call a MoELayer
makes to its dispatcher (as to `moe.dispatch.LocalDispatcher`): it sends each
token to the ranks that own its experts (a variable-size all-to-all,
differentiable: backward is the reverse all-to-all), hands the experts module
only its own experts' tokens, and sends the results back. `limit` applies
capacity to the global batch: the kept assignments are exactly those
LocalDispatcher keeps on the concatenation of all ranks' tokens in rank order
(also for Random Token Selection, whose priorities are drawn for the global
batch from the same generator state on every rank). Also here: which tensors
of a model the dispatchers shard (`moe_layers`, `expert_shards`,
`sharded_state_keys`), and `Traffic`, what a dispatcher sent.

Not here: making a model expert-parallel (transform.py), the process groups
(groups.py), the autograd all-to-all itself (collectives.py).

Shape legend: T tokens, D hidden, E experts (all), L local experts, K top-k,
N this rank's assignments, M assignments this rank's experts receive, P EP
size, W world size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..moe.dispatch import LocalDispatcher, capacity_keep_mask, expert_capacity
from ..moe.layers import MoELayer
from ..moe.routing import Routing
from .collectives import AllToAll, all_to_all_rows
from .groups import ProcessGroups, check_experts


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

    def __init__(self, parallel: ProcessGroups, num_experts: int, name: str = "MoE layer"):
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
        x_MD = AllToAll.apply(x_ND, send_splits, recv_splits, self._exchange)
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
        y_ND = AllToAll.apply(y_MD[inverse_M], plan.recv_splits, plan.send_splits, self._exchange)
        return self._local.combine(y_ND, routing, plan.order_N)

    def _exchange(self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        start = time.perf_counter()
        out = all_to_all_rows(self.parallel, x, send_splits, recv_splits, self.parallel.ep_group,
                              f"the all-to-all of {self.name}")
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
