"""Experts: one stacked weight layout, several kernels chosen by name.

All experts of a layer live in two tensors, in nn.Linear's (out, in) layout:
`w_in_EHD` (for SwiGLU the gate rows, then the up rows: H = 2F) and
`w_out_EDF`. Kernels compute the same function on tokens already grouped by
expert (see dispatch.py):

- `loop`: one matmul pair per expert; the readable reference and the oracle.
- `grouped_mm`: torch._grouped_mm, one call per matmul for all experts; falls
  back to `loop` where the op is missing or the shapes are not 16-byte aligned.
- `bmm`: experts padded to the largest group and run as batched matmuls. On
  CPU each thread then multiplies whole experts on its own, which beats
  splitting every small per-expert matmul across threads. Input that is
  already padded (every expert the same row count) is used in place.
- `native`: inference only, CPU, fp32, SwiGLU or GELU without biases: the
  compiled kernels' fp32 path (moekit.moe.native: plain fp32 dot products,
  nothing rounded), every active expert's gate, up, activation and down in
  one call.
- `auto`: grouped_mm on GPUs where it is native. On CPU in training: bmm for
  near-even loads, grouped_mm once padding would exceed 1.5x the rows (skewed
  loads), loop where neither applies and padding would exceed 8x. At inference
  (no gradients): when every expert has one row (decoding a token; only the
  chosen experts' weights are read) `native` where its vector build runs and
  the weights allow, else loop; more rows, grouped_mm.

`grouped_mm` and `bmm` run the whole expert MLP as one autograd Function
(`_ExpertMLP`): no autograd graph inside, backward keeps only x, the
pre-activation, silu(gate) and the activation, and computes the gradients with
the same batched / grouped matmuls. This module does not move tokens: see
dispatch.py.

Shape legend: N assignments (tokens grouped by expert), D hidden, F expert
width, H = 2F for SwiGLU else F, E experts, C padded slots per expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import native
from .storage import ACTIVATIONS, ExpertsStorage, check_kernel_name, refuse

KERNELS = ("auto", "loop", "grouped_mm", "bmm", "native")
GLU_ACTIVATIONS = ("swiglu", "clamped_swiglu")  # w_in holds the gate rows, then the up rows (H = 2F)

# `auto` pads for bmm while padded rows are at most this many times the real ones.
MAX_PADDING_FACTOR = 8
# ... but where torch._grouped_mm runs, it wins once padding exceeds this factor. Measured fwd+bwd on the
# 2-core CPU, 4096 tokens, Zipf(1.1) expert popularity: 64 experts top-8 (padding 7.5x) grouped_mm 3.4x faster
# than bmm; 8 experts top-2 (padding 2.7x) 2.0x faster; balanced routing (padding ~1.1x) bmm wins
# (benchmarks/moe_layer.py).
GROUPED_OVER_PADDING = 1.5


class ClampedSwiGLU:
    """GPT-OSS's expert activation on [gate | up]: (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g), g = min(gate, l)."""

    def __init__(self, alpha: float, limit: float):
        self.alpha, self.limit = float(alpha), float(limit)

    def __call__(self, h_NH: torch.Tensor) -> torch.Tensor:
        gate, up = h_NH.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def __repr__(self) -> str:
        return f"ClampedSwiGLU(alpha={self.alpha}, limit={self.limit})"


class Experts(ExpertsStorage):
    """E independent MLPs (SwiGLU, GELU or GPT-OSS's clamped SwiGLU) stored as stacked weights: the resident
    experts storage (moekit.moe.storage), and the expert-parallel shards (the local experts' slice).

    bias=True adds `b_in_EH` and `b_out_ED` (GPT-OSS, moefy's encoder experts); the clamped SwiGLU always
    comes with them.
    """

    kernels = KERNELS

    def __init__(self, num_experts: int, hidden_size: int, expert_hidden: int, activation: str = "swiglu", kernel: str = "auto",
                 bias: bool = False, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0):
        super().__init__()
        check_kernel_name("Experts", kernel, KERNELS)
        if activation not in ACTIVATIONS:
            raise refuse("Experts", f"activation={activation!r} is unknown: accepted values are {', '.join(ACTIVATIONS)}")
        if activation == "clamped_swiglu" and not bias:
            raise refuse("Experts", "experts with activation='clamped_swiglu' (GPT-OSS) carry biases and their clamp "
                                    "limit: accepted with bias=True only (GPT-OSS experts cannot be offloaded yet: "
                                    "offloading moves no biases)")
        self.activation = activation
        self.kernel = kernel
        self._act = ClampedSwiGLU(swiglu_alpha, swiglu_limit) if activation == "clamped_swiglu" else activation
        H = 2 * expert_hidden if activation in GLU_ACTIVATIONS else expert_hidden
        self.w_in_EHD = nn.Parameter(torch.empty(num_experts, H, hidden_size))
        self.w_out_EDF = nn.Parameter(torch.empty(num_experts, hidden_size, expert_hidden))
        self.b_in_EH = nn.Parameter(torch.zeros(num_experts, H)) if bias else None
        self.b_out_ED = nn.Parameter(torch.zeros(num_experts, hidden_size)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default init, per expert.
        for w in (self.w_in_EHD, self.w_out_EDF):
            bound = 1 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
        for b in (self.b_in_EH, self.b_out_ED):
            if b is not None:
                nn.init.zeros_(b)

    @property
    def shape_EHDF(self) -> tuple[int, int, int, int]:
        E, H, D = self.w_in_EHD.shape
        return E, H, D, self.w_out_EDF.shape[2]

    @property
    def has_bias(self) -> bool:
        return self.b_in_EH is not None

    def kernel_for(self, x: torch.Tensor, counts_E: torch.Tensor | None = None, kernel: str | None = None) -> str:
        """The kernel a call would run: `kernel` (or the module's) with `auto` resolved.

        x only lends its dtype, device and (without counts) its row count.
        """
        name = kernel or self.kernel
        check_kernel_name("Experts", name, KERNELS)
        if name == "auto":
            return choose_kernel(x, self.w_in_EHD, self.w_out_EDF, counts_E, self.activation, self.b_in_EH)
        if name == "native" and not native_fits(x, self.w_in_EHD, self.w_out_EDF, self.activation, self.b_in_EH):
            name = "loop"
        return name

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        name = self.kernel_for(x_ND, counts_E, kernel)
        fn = {"loop": loop_experts, "grouped_mm": grouped_mm_experts, "bmm": bmm_experts, "native": native_experts}[name]
        if self.b_in_EH is None:
            return fn(x_ND, counts_E, self.w_in_EHD, self.w_out_EDF, self._act)
        return fn(x_ND, counts_E, self.w_in_EHD, self.w_out_EDF, self._act, self.b_in_EH, self.b_out_ED)


def activate(h_NH: torch.Tensor, activation) -> torch.Tensor:
    """activation: "swiglu", "gelu", or a callable on [gate | up] (ClampedSwiGLU)."""
    if activation == "swiglu":
        gate, up = h_NH.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(h_NH)
    return activation(h_NH)


def _linear_pair(x, w_in_HD, w_out_DF, activation, b_in_H=None, b_out_D=None):
    return F.linear(activate(F.linear(x, w_in_HD, b_in_H), activation), w_out_DF, b_out_D)


def loop_experts(x_ND, counts_E, w_in_EHD, w_out_EDF, activation, b_in_EH=None, b_out_ED=None) -> torch.Tensor:
    """The reference: each expert's tokens through its own two matmuls (plus its biases, when it has them)."""
    biased = b_in_EH is not None
    if not _needs_grad(x_ND, w_in_EHD, w_out_EDF, *((b_in_EH, b_out_ED) if biased else ())):
        return _loop_active(x_ND, counts_E, w_in_EHD, w_out_EDF, activation, b_in_EH, b_out_ED)
    outputs = []
    start = 0
    b_in = b_in_EH.unbind(0) if biased else [None] * len(counts_E)
    b_out = b_out_ED.unbind(0) if biased else [None] * len(counts_E)
    # unbind, not w[e]: indexing would build a full-size gradient per expert in backward.
    for w_in_HD, w_out_DF, bi, bo, count in zip(w_in_EHD.unbind(0), w_out_EDF.unbind(0), b_in, b_out, counts_E.tolist()):
        if count:
            outputs.append(_linear_pair(x_ND[start : start + count], w_in_HD, w_out_DF, activation, bi, bo))
        start += count
    if not outputs:
        # Keep the weights in the graph so every parameter gets a (zero) gradient.
        empty = (x_ND[:, :1] * 0).expand(0, w_out_EDF.shape[1])
        extra = (b_in_EH.sum() + b_out_ED.sum()) if biased else 0
        return empty + 0 * (w_in_EHD.sum() + w_out_EDF.sum() + extra)
    return torch.cat(outputs)


def _loop_active(x_ND, counts_E, w_in_EHD, w_out_EDF, activation, b_in_EH=None, b_out_ED=None) -> torch.Tensor:
    """`loop` without autograd: the same matmuls, visiting only the experts that have rows.

    Decoding sends a token to k of E experts; this reads only those k experts' weights.
    """
    outputs, start = [], 0
    for e, count in enumerate(counts_E.tolist()):
        if count:
            bi, bo = (b_in_EH[e], b_out_ED[e]) if b_in_EH is not None else (None, None)
            outputs.append(_linear_pair(x_ND[start : start + count], w_in_EHD[e], w_out_EDF[e], activation, bi, bo))
        start += count
    if not outputs:
        return x_ND.new_empty(0, w_out_EDF.shape[1])
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def native_fits(x_ND, w_in_EHD, w_out_EDF, activation, b_in_EH=None) -> bool:
    """Whether the `native` kernel runs these experts: inference on the CPU, fp32, SwiGLU / GELU, no biases."""
    return (native.isa() not in ("none", "generic") and activation in native.ACTIVATIONS and b_in_EH is None
            and x_ND.device.type == "cpu" and w_in_EHD.dtype == torch.float32 and x_ND.dtype == torch.float32
            and w_in_EHD.is_contiguous() and w_out_EDF.is_contiguous() and not _needs_grad(x_ND, w_in_EHD, w_out_EDF))


def native_experts(x_ND, counts_E, w_in_EHD, w_out_EDF, activation) -> torch.Tensor:
    """The compiled kernels' fp32 path: every active expert in one call (inference only: no backward)."""
    groups = native.groups_of(counts_E)
    return native.moe(x_ND, native.f32_weight(w_in_EHD), native.f32_weight(w_out_EDF), groups, activation)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def grouped_mm_supported(x_ND: torch.Tensor, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor) -> bool:
    """torch._grouped_mm needs the op, a float dtype and 16-byte aligned rows."""
    if not hasattr(torch, "_grouped_mm") or x_ND.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x_ND.device.type == "cuda" and (x_ND.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x_ND.device)[0] < 9):
        return False
    align = 16 // x_ND.element_size()
    return all(n % align == 0 for n in (*w_in_EHD.shape[1:], w_out_EDF.shape[2]))


def grouped_mm_experts(x_ND, counts_E, w_in_EHD, w_out_EDF, activation, b_in_EH=None, b_out_ED=None) -> torch.Tensor:
    """All experts in grouped matmul calls (falls back to `loop` when unsupported)."""
    x_ND, w_in_EHD, w_out_EDF = _autocast_inputs(x_ND, w_in_EHD, w_out_EDF)
    b_in_EH, b_out_ED = _autocast_bias(x_ND, b_in_EH, b_out_ED)
    plain = b_in_EH is None and activation in ("swiglu", "gelu")
    if (x_ND.shape[0] == 0 or not grouped_mm_supported(x_ND, w_in_EHD, w_out_EDF)
            or (not plain and _needs_grad(x_ND, w_in_EHD, w_out_EDF, *_present(b_in_EH, b_out_ED)))):
        # torch._grouped_mm has no usable autograd of its own: biased / clamped experts train through `loop`.
        return loop_experts(x_ND, counts_E, w_in_EHD, w_out_EDF, activation, b_in_EH, b_out_ED)
    offs_E = counts_E.cumsum(0).to(torch.int32)
    bias_N = None
    if b_in_EH is not None:
        expert_N = torch.repeat_interleave(torch.arange(len(counts_E), device=x_ND.device), counts_E, output_size=x_ND.shape[0])
        bias_N = (b_in_EH[expert_N], b_out_ED[expert_N])
    with _no_autocast(x_ND):
        return _expert_mlp(x_ND, w_in_EHD, w_out_EDF, activation, offs_E, bias_N)


def bmm_experts(x_ND, counts_E, w_in_EHD, w_out_EDF, activation, b_in_EH=None, b_out_ED=None) -> torch.Tensor:
    """Experts padded to the largest group (capacity C) and run as batched matmuls."""
    x_ND, w_in_EHD, w_out_EDF = _autocast_inputs(x_ND, w_in_EHD, w_out_EDF)
    b_in_EH, b_out_ED = _autocast_bias(x_ND, b_in_EH, b_out_ED)
    E, (N, D) = w_in_EHD.shape[0], x_ND.shape
    if N == 0:
        return loop_experts(x_ND, counts_E, w_in_EHD, w_out_EDF, activation, b_in_EH, b_out_ED)
    C = int(counts_E.max())
    bias = (b_in_EH[:, None, :], b_out_ED[:, None, :]) if b_in_EH is not None else None
    with _no_autocast(x_ND):
        if N == E * C:  # already padded (or perfectly even): no copies
            return _expert_mlp(x_ND.reshape(E, C, D), w_in_EHD, w_out_EDF, activation, None, bias).view(N, D)
        starts_E = counts_E.cumsum(0) - counts_E
        expert_N = torch.repeat_interleave(torch.arange(E, device=x_ND.device), counts_E, output_size=N)
        slot_N = expert_N * C + (torch.arange(N, device=x_ND.device) - starts_E[expert_N])
        x_ECD = x_ND.new_zeros(E * C, D).index_copy(0, slot_N, x_ND).view(E, C, D)
        y_ECD = _expert_mlp(x_ECD, w_in_EHD, w_out_EDF, activation, None, bias)
        return y_ECD.reshape(E * C, D)[slot_N]


def choose_kernel(x_ND: torch.Tensor, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor,
                  counts_E: torch.Tensor | None = None, activation=None, b_in_EH=None) -> str:
    """The kernel `auto` runs for these rows (x lends dtype, device and, without counts, the row count).

    Where torch._grouped_mm is a native GPU kernel it wins. Elsewhere one
    batched matmul over padded experts beats a matmul per expert even with
    heavy padding: on a 2-core CPU each small per-expert matmul pays a thread
    hand-off that costs more than the padded rows (measured from decoding, 8x
    padding, to 4096-token prefill). Only when nearly all experts are idle does
    the per-expert loop, which reads only the busy experts' weights, win.
    """
    grouped = grouped_mm_supported(x_ND, w_in_EHD, w_out_EDF)
    if grouped and x_ND.device.type == "cuda":
        return "grouped_mm"
    E = w_in_EHD.shape[0]
    if counts_E is not None:
        N, most = int(counts_E.sum()), int(counts_E.max()) if counts_E.numel() else 0
    else:  # without the counts, assume an even load
        N = x_ND.shape[0]
        most = -(-N // E)
    if not _needs_grad(x_ND, w_in_EHD, w_out_EDF):
        # Inference reads weights more than it multiplies: one row per active expert (decoding a token)
        # is a matmul pair per chosen expert; more rows, one grouped call that reads only the active experts.
        if most <= 1:
            # (native: for callers that name the activation, and only where it runs those experts)
            return "native" if activation is not None and native_fits(x_ND, w_in_EHD, w_out_EDF, activation, b_in_EH) else "loop"
        if grouped:
            return "grouped_mm"
    padded_rows = E * most if N else 0
    if grouped and N and padded_rows > GROUPED_OVER_PADDING * N:
        return "grouped_mm"  # skewed load: one grouped call without the padding beats padded bmm
    return "bmm" if N and padded_rows <= MAX_PADDING_FACTOR * N else "loop"


# ---------------------------------------------------------------- the fused expert MLP


def _expert_mlp(x, w_in_EHD, w_out_EDF, activation, offs, bias=None):
    """The expert MLP through `_ExpertMLP`, or straight through when no gradient is wanted.

    bias: (input bias, output bias) broadcastable to the two matmul outputs, or None. Biased or
    clamped experts always go straight through (autograd then runs through the bmm ops themselves).
    """
    plain = bias is None and activation in ("swiglu", "gelu")
    if plain and torch.is_grad_enabled() and (x.requires_grad or w_in_EHD.requires_grad or w_out_EDF.requires_grad):
        return _ExpertMLP.apply(x, w_in_EHD, w_out_EDF, activation, offs)
    h = _mm(x, w_in_EHD.transpose(1, 2), offs)
    if bias is not None:
        h = h + bias[0]
    if activation == "swiglu" and not torch.is_grad_enabled():
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate).mul_(up)
    else:
        act = activate(h, activation)
    y = _mm(act, w_out_EDF.transpose(1, 2), offs)
    return y + bias[1] if bias is not None else y


class _ExpertMLP(torch.autograd.Function):
    """y = act(x @ w_in^T) @ w_out^T per expert, with a hand-written backward.

    offs=None: x is [E, C, D] and the matmuls are bmm; otherwise x is [N, D]
    grouped by expert, offs the cumulative counts, and the matmuls are
    torch._grouped_mm. Saves x, the pre-activation h, silu(gate) (SwiGLU) and
    the activation; backward needs nothing else and no autograd graph.
    """

    @staticmethod
    def forward(ctx, x, w_in_EHD, w_out_EDF, activation, offs):
        h = _mm(x, w_in_EHD.transpose(1, 2), offs)
        act, silu_gate = _act_forward(h, activation)
        y = _mm(act, w_out_EDF.transpose(1, 2), offs)
        ctx.activation = activation
        ctx.save_for_backward(x, w_in_EHD, w_out_EDF, h, silu_gate, act, offs)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, w_in_EHD, w_out_EDF, h, silu_gate, act, offs = ctx.saved_tensors
        need_x, need_w_in, need_w_out = ctx.needs_input_grad[:3]
        grad_y = grad_y.contiguous()
        grad_w_out = _mm_t(grad_y, act, offs) if need_w_out else None
        grad_h = _act_backward(grad_y, w_out_EDF, offs, h, silu_gate, ctx.activation)
        grad_x = _mm(grad_h, w_in_EHD, offs) if need_x else None
        grad_w_in = _mm_t(grad_h, x, offs) if need_w_in else None
        return grad_x, grad_w_in, grad_w_out, None, None


def _mm(a, b_EKM, offs):
    """a @ b per expert: a [E, C, K] with bmm, or a [N, K] grouped by offs."""
    return torch.bmm(a, b_EKM) if offs is None else torch._grouped_mm(a, b_EKM, offs=offs)


def _mm_t(a, b, offs):
    """a^T @ b per expert (weight gradients): [E, A, B] from a [.., A] and b [.., B] rows."""
    if offs is None:
        return torch.bmm(a.transpose(1, 2), b)
    return torch._grouped_mm(a.t(), b, offs=offs)


def _act_forward(h, activation):
    """(activation, silu(gate) for SwiGLU's backward or None)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        return silu_gate * up, silu_gate
    return F.gelu(h), None


def _act_backward(grad_y, w_out_EDF, offs, h, silu_gate, activation):
    """Gradient wrt the pre-activation h, from the gradient of the expert output."""
    grad_act = _mm(grad_y, w_out_EDF, offs)
    if activation != "swiglu":
        return torch.ops.aten.gelu_backward.grad_input(grad_act, h, grad_input=grad_act)
    gate, up = h.chunk(2, dim=-1)
    grad_h = torch.empty_like(h)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)
    torch.mul(grad_act, silu_gate, out=grad_up)
    torch.ops.aten.silu_backward.grad_input(grad_act.mul_(up), gate, grad_input=grad_gate)
    return grad_h


def _autocast_inputs(x, w_in, w_out):
    """Under autocast, the kernels' matmuls run in the autocast dtype (as F.linear would)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, w_in, w_out
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), w_in.to(dtype), w_out.to(dtype)


def _autocast_bias(x, b_in, b_out):
    if b_in is None or b_in.dtype == x.dtype:
        return b_in, b_out
    return b_in.to(x.dtype), b_out.to(x.dtype)


def _present(*tensors):
    return [t for t in tensors if t is not None]


def _no_autocast(x):
    return torch.autocast(x.device.type, enabled=False)
