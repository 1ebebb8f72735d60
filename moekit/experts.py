"""Experts: one stacked weight layout, several kernels chosen by name.

All experts of a layer live in two tensors, in nn.Linear's (out, in) layout:
`w_in_EHD` (for SwiGLU the gate rows, then the up rows: H = 2F) and
`w_out_EDF`. Kernels compute the same function on tokens already grouped by
expert (see dispatch.py):

- `loop`: one matmul pair per expert; the readable reference and the oracle.
- `grouped_mm`: torch._grouped_mm, one call for all experts; falls back to
  `loop` where the op is missing or the shapes are not 16-byte aligned.
- `bmm`: experts padded to the largest group and run as one batched matmul.
- `auto`: grouped_mm when it applies, otherwise bmm for large batches and
  loop for small ones (decode).

Shape legend: N assignments (tokens grouped by expert), D hidden, F expert
width, H = 2F for SwiGLU else F, E experts, C padded slots per expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

KERNELS = ("auto", "loop", "grouped_mm", "bmm")


class Experts(nn.Module):
    """E independent MLPs (SwiGLU or GELU) stored as stacked weights."""

    def __init__(self, num_experts: int, hidden_size: int, expert_hidden: int, activation: str = "swiglu", kernel: str = "auto"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r} is unknown: accepted values are {', '.join(KERNELS)}")
        self.activation = activation
        self.kernel = kernel
        H = 2 * expert_hidden if activation == "swiglu" else expert_hidden
        self.w_in_EHD = nn.Parameter(torch.empty(num_experts, H, hidden_size))
        self.w_out_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, expert_hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default init, per expert.
        for w in (self.w_in_EHD, self.w_out_EDF):
            bound = 1 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    @property
    def num_experts(self) -> int:
        return self.w_in_EHD.shape[0]

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        name = kernel or self.kernel
        if name not in KERNELS:
            raise ValueError(f"kernel={name!r} is unknown: accepted values are {', '.join(KERNELS)}")
        if name == "auto":
            name = choose_kernel(x_ND, self.w_in_EHD, self.w_out_EDF)
        fn = {"loop": loop_experts, "grouped_mm": grouped_mm_experts, "bmm": bmm_experts}[name]
        return fn(x_ND, counts_E, self.w_in_EHD, self.w_out_EDF, self.activation)


def activate(h_NH: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = h_NH.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h_NH)


def loop_experts(x_ND, counts_E, w_in_EHD, w_out_EDF, activation) -> torch.Tensor:
    """The reference: each expert's tokens through its own two matmuls."""
    outputs = []
    start = 0
    # unbind, not w[e]: indexing would build a full-size gradient per expert in backward.
    for w_in_HD, w_out_DF, count in zip(w_in_EHD.unbind(0), w_out_EDF.unbind(0), counts_E.tolist()):
        if count:
            x = x_ND[start : start + count]
            outputs.append(F.linear(activate(F.linear(x, w_in_HD), activation), w_out_DF))
        start += count
    if not outputs:
        # Keep the weights in the graph so every parameter gets a (zero) gradient.
        empty = (x_ND[:, :1] * 0).expand(0, w_out_EDF.shape[1])
        return empty + 0 * (w_in_EHD.sum() + w_out_EDF.sum())
    return torch.cat(outputs)


def grouped_mm_supported(x_ND: torch.Tensor, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor) -> bool:
    """torch._grouped_mm needs the op, a float dtype and 16-byte aligned rows."""
    if not hasattr(torch, "_grouped_mm") or x_ND.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x_ND.device.type == "cuda" and (x_ND.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x_ND.device)[0] < 9):
        return False
    align = 16 // x_ND.element_size()
    return all(n % align == 0 for n in (*w_in_EHD.shape[1:], w_out_EDF.shape[2]))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    _grouped_mm's backward rejects expanded (stride-0) gradients such as the
    one `y.sum().backward()` produces.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_experts(x_ND, counts_E, w_in_EHD, w_out_EDF, activation) -> torch.Tensor:
    """All experts in two grouped matmul calls (falls back to `loop` when unsupported)."""
    if not grouped_mm_supported(x_ND, w_in_EHD, w_out_EDF):
        return loop_experts(x_ND, counts_E, w_in_EHD, w_out_EDF, activation)
    offs_E = counts_E.cumsum(0).to(torch.int32)
    h_NH = torch._grouped_mm(x_ND, w_in_EHD.transpose(1, 2), offs=offs_E)
    y_ND = torch._grouped_mm(activate(_ContiguousGrad.apply(h_NH), activation), w_out_EDF.transpose(1, 2), offs=offs_E)
    return _ContiguousGrad.apply(y_ND)


def bmm_experts(x_ND, counts_E, w_in_EHD, w_out_EDF, activation) -> torch.Tensor:
    """Experts padded to the largest group (capacity C) and run as one bmm."""
    E, D = w_in_EHD.shape[0], x_ND.shape[1]
    N = x_ND.shape[0]
    if N == 0:
        return loop_experts(x_ND, counts_E, w_in_EHD, w_out_EDF, activation)
    C = int(counts_E.max())
    starts_E = counts_E.cumsum(0) - counts_E
    expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E, output_size=N)
    slot_N = expert_N * C + (torch.arange(N, device=x_ND.device) - starts_E[expert_N])
    x_ECD = x_ND.new_zeros(E * C, D).index_copy(0, slot_N, x_ND).view(E, C, D)
    h_ECH = torch.bmm(x_ECD, w_in_EHD.transpose(1, 2))
    y_ECD = torch.bmm(activate(h_ECH, activation), w_out_EDF.transpose(1, 2))
    return y_ECD.reshape(E * C, D)[slot_N]


def choose_kernel(x_ND: torch.Tensor, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor) -> str:
    if grouped_mm_supported(x_ND, w_in_EHD, w_out_EDF):
        return "grouped_mm"
    return "loop" if x_ND.shape[0] <= 4 * w_in_EHD.shape[0] else "bmm"
