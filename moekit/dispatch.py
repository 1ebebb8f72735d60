"""Dispatch: capacity limits, then tokens grouped by expert and back again.

The router says who goes where; the dispatcher decides what fits (capacity,
token dropping) and moves the tokens. `LocalDispatcher` permutes within one
process; the expert-parallel dispatcher swaps in an all-to-all without any
change to routers or experts, because both speak only `Routing`.

Shape legend: T tokens, D hidden, E experts, K top-k, N assignments.
"""

from __future__ import annotations

import math

import torch

from .routing import Routing


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float, min_capacity: int = 0) -> int | None:
    """Slots per expert: ceil(k * tokens / experts * factor), at least min_capacity; None = dropless."""
    if factor <= 0:
        return None
    return max(min_capacity, math.ceil(top_k * num_tokens / num_experts * factor))


def capacity_keep_mask(
    routing: Routing, capacity: int, policy: str = "position", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Which assignments fit when each expert takes at most `capacity` of them.

    Token-choice routings arrive token-major with K slots per token. "position"
    keeps all first choices before any second choice, earlier tokens first
    (GShard / DeepSpeed-MoE); "random" is Random Token Selection: a random
    priority per token, reproducible through `generator`.
    """
    N, T = routing.expert_idx_N.numel(), routing.num_tokens
    device = routing.expert_idx_N.device
    if N == 0:
        return torch.ones(0, dtype=torch.bool, device=device)
    K = max(N // max(T, 1), 1)
    token_N = routing.token_idx_N
    slot_N = torch.arange(N, device=device) % K
    if policy == "random":
        priority_T = torch.rand(T, generator=generator, device="cpu").to(device)
        key_N = slot_N.double() + priority_T[token_N].double()  # all first choices still come first
    else:
        key_N = (slot_N * T + token_N).double()
    rank_N = torch.empty(N, dtype=torch.long, device=device)
    rank_N[key_N.argsort(stable=True)] = torch.arange(N, device=device)
    order_N = (routing.expert_idx_N * N + rank_N).argsort()
    counts_E = torch.bincount(routing.expert_idx_N, minlength=routing.num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    sorted_expert = routing.expert_idx_N[order_N]
    pos_in_expert = torch.arange(N, device=device) - starts_E[sorted_expert]
    keep_N = torch.empty(N, dtype=torch.bool, device=device)
    keep_N[order_N] = pos_in_expert < capacity
    return keep_N


class LocalDispatcher:
    """Groups a process's tokens by expert and scatters the results back."""

    def limit(
        self,
        routing: Routing,
        top_k: int,
        factor: float,
        min_capacity: int = 0,
        policy: str = "position",
        generator: torch.Generator | None = None,
    ) -> Routing:
        """Apply the capacity limit; a factor <= 0 leaves the routing dropless."""
        capacity = expert_capacity(routing.num_tokens, top_k, routing.num_experts, factor, min_capacity)
        if capacity is None:
            return routing
        return routing.without(capacity_keep_mask(routing, capacity, policy, generator))

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens sorted by expert: (x_ND, counts_E, order_N) where order_N maps sorted -> assignment."""
        order_N = routing.expert_idx_N.argsort(stable=True)
        x_ND = x_TD[routing.token_idx_N[order_N]]
        return x_ND, routing.counts_E, order_N

    def combine(self, y_ND: torch.Tensor, routing: Routing, order_N: torch.Tensor) -> torch.Tensor:
        """Weighted sum of each token's expert outputs, back in token order."""
        weighted_ND = y_ND * routing.weight_N[order_N, None].to(y_ND.dtype)
        y_TD = y_ND.new_zeros(routing.num_tokens, y_ND.shape[-1])
        return y_TD.index_add(0, routing.token_idx_N[order_N], weighted_ND)
