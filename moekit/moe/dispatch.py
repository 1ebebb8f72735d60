"""Dispatch: capacity limits, then tokens grouped by expert and back again.

The router says who goes where; the dispatcher decides what fits (capacity,
token dropping) and moves the tokens. `LocalDispatcher` permutes within one
process; the expert-parallel dispatcher swaps in an all-to-all without any
change to routers or experts, because both speak only `Routing`.

Tokens move between token order and a buffer grouped by expert (`Slots`:
compact, or padded to a capacity so batched kernels need no further copy).
Both directions are autograd Functions with hand-written backwards: for
dropless token choice (K rows per token) the way back is one fused
gather-and-sum (embedding_bag) instead of a scatter-add.

Shape legend: T tokens, D hidden, E experts, K top-k, N assignments, S buffer rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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


# ---------------------------------------------------------------- moving tokens


@dataclass
class Slots:
    """Where each assignment's row lives in the buffer the experts read.

    Expert e owns `rows_E[e]` consecutive rows, experts in order. Compact
    buffers hold exactly the assignments (rows_E = counts); padded ones give
    every expert `capacity` rows, the unused ones zero, so the experts can run
    as one batched matmul without further copies.
    """

    slot_N: torch.Tensor  # assignment n -> buffer row
    token_S: torch.Tensor  # buffer row -> token (0 on padding rows, whose input is zeroed)
    rows_E: torch.Tensor  # rows per expert in the buffer
    pad_rows: torch.Tensor | None  # indices of padding rows; None when there are none
    top_k: int  # > 0: assignments are token-major, exactly top_k per token (gather-and-sum fast paths)

    @property
    def num_rows(self) -> int:
        return self.token_S.shape[0]


def expert_slots(routing: Routing, capacity: int | None = None, order_N: torch.Tensor | None = None) -> Slots:
    """Buffer rows for a routing: compact (capacity=None) or `capacity` rows per expert.

    order_N (sorted row -> assignment, as `dispatch` returns it) fixes a
    compact layout already chosen; by default assignments keep their order
    inside each expert.
    """
    expert_N, token_N = routing.expert_idx_N, routing.token_idx_N
    N, E, device = expert_N.numel(), routing.num_experts, expert_N.device
    counts_E = routing.counts_E
    if order_N is None:
        order_N = stable_expert_order(expert_N)
    rank_N = torch.empty_like(order_N)  # assignment -> its row in the compact layout
    rank_N[order_N] = torch.arange(N, device=device)
    if capacity is None:
        return Slots(rank_N, token_N[order_N], counts_E, None, _token_major_k(routing))
    if N and capacity < int(counts_E.max()):
        raise ValueError(f"capacity={capacity} is below the largest expert load {int(counts_E.max())}")
    first_E = torch.arange(E, device=device) * capacity
    starts_E = counts_E.cumsum(0) - counts_E
    slot_N = rank_N + (first_E - starts_E)[expert_N]
    token_S = torch.zeros(E * capacity, dtype=token_N.dtype, device=device)
    token_S[slot_N] = token_N
    pad_E = capacity - counts_E
    num_pad = E * capacity - N
    pad_rows = None
    if num_pad:  # expert e pads rows e*C + counts_e .. (e+1)*C - 1
        pad_starts_E = first_E + counts_E - (pad_E.cumsum(0) - pad_E)
        pad_rows = pad_starts_E.repeat_interleave(pad_E, output_size=num_pad) + torch.arange(num_pad, device=device)
    return Slots(slot_N, token_S, torch.full_like(counts_E, capacity), pad_rows, _token_major_k(routing))


def stable_expert_order(expert_N: torch.Tensor) -> torch.Tensor:
    """Assignments sorted by expert, keeping their order inside an expert."""
    if expert_N.device.type == "cpu" and expert_N.numel() < 2**24:
        # Float keys are exact here and avoid torch's integer radix sort, which
        # can take hundreds of milliseconds on a busy 2-core machine.
        return expert_N.float().argsort(stable=True)
    return expert_N.argsort(stable=True)


def _token_major_k(routing: Routing) -> int:
    """K when token t's assignments are exactly rows t*K .. t*K+K-1 (dropless token choice), else 0."""
    N, T = routing.token_idx_N.numel(), routing.num_tokens
    if T == 0 or N == 0 or N % T:
        return 0
    K = N // T
    expected = torch.arange(T, device=routing.token_idx_N.device)[:, None]
    return K if bool((routing.token_idx_N.view(T, K) == expected).all()) else 0


def _gather_rows(x_TD, token_S, pad_rows) -> torch.Tensor:
    """x_SD[s] = x_TD[token_S[s]], padding rows zero."""
    x_SD = x_TD.index_select(0, token_S)
    if pad_rows is not None:
        x_SD.index_fill_(0, pad_rows, 0)
    return x_SD


class _Gather(torch.autograd.Function):
    """x_SD[s] = x_TD[token_S[s]] (padding rows zero); backward sums each token's rows."""

    @staticmethod
    def forward(ctx, x_TD, token_S, pad_rows, slot_N, token_N, top_k):
        x_SD = _gather_rows(x_TD, token_S, pad_rows)
        ctx.save_for_backward(slot_N, token_N)
        ctx.num_tokens, ctx.top_k = x_TD.shape[0], top_k
        return x_SD

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_SD):
        slot_N, token_N = ctx.saved_tensors
        return _sum_rows_per_token(grad_SD.contiguous(), slot_N, token_N, ctx.num_tokens, ctx.top_k), None, None, None, None, None


class _Combine(torch.autograd.Function):
    """y_TD[t] = sum of weight_N[n] * y_SD[slot_N[n]] over token t's assignments n."""

    @staticmethod
    def forward(ctx, y_SD, weight_N, slot_N, token_N, token_S, num_tokens, top_k):
        ctx.save_for_backward(y_SD, weight_N, slot_N, token_N, token_S)
        return _sum_rows_per_token(y_SD, slot_N, token_N, num_tokens, top_k, weight_N)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_TD):
        y_SD, weight_N, slot_N, token_N, token_S = ctx.saved_tensors
        grad_TD = grad_TD.contiguous()
        grad_weight = _assignment_dots(y_SD, slot_N, grad_TD, token_N) if ctx.needs_input_grad[1] else None
        weight_S = weight_N.new_zeros(y_SD.shape[0])  # padding rows: weight 0, so their gradient is 0
        weight_S[slot_N] = weight_N
        return _scaled_rows(grad_TD, token_S, weight_S), grad_weight, None, None, None, None, None


def _scaled_rows(x_TD: torch.Tensor, token_S: torch.Tensor, weight_S: torch.Tensor) -> torch.Tensor:
    """weight_S[s] * x_TD[token_S[s]] in one pass (embedding_bag with one row per bag) where it applies."""
    if x_TD.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return F.embedding_bag(token_S[:, None], x_TD, per_sample_weights=weight_S[:, None], mode="sum")
    return x_TD.index_select(0, token_S) * weight_S[:, None]


def _assignment_dots(y_SD, slot_N, g_TD, token_N) -> torch.Tensor:
    """<y_SD[slot_N[n]], g_TD[token_N[n]]> per assignment n: the gradient of the combine weights.

    embedding_bag's per-sample-weight gradient computes exactly this in one
    pass without temporaries (the assignments need not be grouped by token).
    """
    op = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)
    if op is not None and y_SD.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        offsets = torch.zeros(g_TD.shape[0], dtype=slot_N.dtype, device=slot_N.device)  # read only through offset2bag
        return op(g_TD, y_SD, slot_N, offsets, token_N, 0)
    return torch.linalg.vecdot(y_SD.index_select(0, slot_N), g_TD.index_select(0, token_N))


def _sum_rows_per_token(rows_SD, slot_N, token_N, num_tokens, top_k, weight_N=None):
    """out[t] = sum over token t's assignments n of (weight_N[n] *) rows_SD[slot_N[n]]."""
    if top_k and rows_SD.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        # One fused gather-and-sum pass (token-major assignments: token t owns t*K .. t*K+K-1).
        weights = None if weight_N is None else weight_N.view(num_tokens, top_k)
        return F.embedding_bag(slot_N.view(num_tokens, top_k), rows_SD.contiguous(), per_sample_weights=weights, mode="sum")
    picked = rows_SD.index_select(0, slot_N)
    if weight_N is not None:
        picked = picked * weight_N[:, None]
    return rows_SD.new_zeros(num_tokens, rows_SD.shape[1]).index_add_(0, token_N, picked)


class LocalDispatcher:
    """Groups a process's tokens by expert and scatters the results back.

    `run` is the one call an MoE layer makes: tokens go straight into the
    layout the experts' kernel wants (compact, or padded to the largest load
    for `bmm`), the experts compute, and the weighted outputs come back in
    token order. Any experts storage works (resident, offloaded, quantized):
    it only has to answer `kernel_for(x, counts_E)` and
    `forward(x_SD, rows_E, kernel=...)`.
    """

    def run(self, x_TD: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
        """y_TD = sum over token t's assignments of weight * expert(x_t)."""
        counts_E = routing.counts_E
        kernel = experts.kernel_for(x_TD, counts_E)
        if routing.num_tokens == 1 and not (torch.is_grad_enabled() and x_TD.requires_grad):
            return self._run_one_token(x_TD, routing, experts, counts_E, kernel)
        capacity = int(counts_E.max()) if kernel == "bmm" and routing.expert_idx_N.numel() else None
        slots = self.slots(routing, capacity)
        x_SD = self.gather(x_TD, routing, slots)
        y_SD = experts(x_SD, slots.rows_E, kernel=kernel)
        return self.combine_slots(y_SD, routing, slots)

    @staticmethod
    def _run_one_token(x_TD, routing, experts, counts_E, kernel) -> torch.Tensor:
        """Decoding one token at inference: its assignments go to distinct experts, so the expert-ordered
        buffer is the token repeated; no layout to build, and the weighted sum is one reduction."""
        order_N = routing.expert_idx_N.argsort()
        y_SD = experts(x_TD.expand(order_N.numel(), -1).contiguous(), counts_E, kernel=kernel)
        weight_S = routing.weight_N.to(y_SD.dtype)[order_N]
        return (y_SD * weight_S[:, None]).sum(0, keepdim=True)

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
        order_N = stable_expert_order(routing.expert_idx_N)
        slots = expert_slots(routing, order_N=order_N)
        return self.gather(x_TD, routing, slots), slots.rows_E, order_N

    def combine(self, y_ND: torch.Tensor, routing: Routing, order_N: torch.Tensor) -> torch.Tensor:
        """Weighted sum of each token's expert outputs, back in token order."""
        return self.combine_slots(y_ND, routing, expert_slots(routing, order_N=order_N))

    def slots(self, routing: Routing, capacity: int | None = None) -> Slots:
        """Buffer rows for `gather` / `combine_slots`: compact, or `capacity` rows per expert."""
        return expert_slots(routing, capacity)

    def gather(self, x_TD: torch.Tensor, routing: Routing, slots: Slots) -> torch.Tensor:
        """The experts' input buffer: each assignment's token row at its slot."""
        if not (torch.is_grad_enabled() and x_TD.requires_grad):  # inference: the same ops, no autograd Function
            return _gather_rows(x_TD, slots.token_S, slots.pad_rows)
        return _Gather.apply(x_TD, slots.token_S, slots.pad_rows, slots.slot_N, routing.token_idx_N, slots.top_k)

    def combine_slots(self, y_SD: torch.Tensor, routing: Routing, slots: Slots) -> torch.Tensor:
        """Weighted sum of each token's rows of the experts' output buffer, in token order."""
        weight_N = routing.weight_N.to(y_SD.dtype)
        if not (torch.is_grad_enabled() and (y_SD.requires_grad or weight_N.requires_grad)):
            return _sum_rows_per_token(y_SD, slots.slot_N, routing.token_idx_N, routing.num_tokens, slots.top_k, weight_N)
        return _Combine.apply(y_SD, weight_N, slots.slot_N, routing.token_idx_N, slots.token_S, routing.num_tokens, slots.top_k)
