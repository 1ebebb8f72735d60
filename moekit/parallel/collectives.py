"""Differentiable collectives for expert parallelism: the variable-size all-to-all and a summing all-reduce.

`AllToAll.apply(x, send_splits, recv_splits, exchange)` moves rows between
the ranks of a group with `exchange` (a function doing one non-differentiable
variable-size all-to-all, e.g. `all_to_all_rows` bound to a group); backward
sends the gradients back the same way with the splits swapped.
`AllReduceSum.apply(x, parallel, what)` sums over the world, and so does its
backward.

Not here: the process groups and the plain (non-autograd) collectives with
their failure messages (groups.py), token bookkeeping and traffic counts
(dispatcher.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .groups import ProcessGroups

Exchange = Callable[[torch.Tensor, list[int], list[int]], torch.Tensor]


def all_to_all_rows(parallel: ProcessGroups, x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                    group, what: str) -> torch.Tensor:
    """Rows of x split by `send_splits` to the ranks of `group`; returns the `sum(recv_splits)` rows received."""
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    parallel.call(what, dist.all_to_all_single, out, x, recv_splits, send_splits, group=group)
    return out


class AllToAll(torch.autograd.Function):
    """Variable-size all-to-all; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, send_splits: list[int], recv_splits: list[int], exchange: Exchange):
        ctx.splits = (send_splits, recv_splits)
        ctx.exchange = exchange
        return exchange(x, send_splits, recv_splits)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return ctx.exchange(grad, recv_splits, send_splits), None, None, None


class AllReduceSum(torch.autograd.Function):
    """Sum over the world; the gradient of each rank's input is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, x, parallel: ProcessGroups, what: str):
        ctx.parallel, ctx.what = parallel, what
        return parallel.all_reduce(x.detach().clone().contiguous(), what=what)

    @staticmethod
    def backward(ctx, grad):
        return ctx.parallel.all_reduce(grad.clone().contiguous(), what=f"{ctx.what} (backward)"), None, None
