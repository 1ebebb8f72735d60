"""Modules holding GGUF weights in their own block formats: GGUFExperts (an experts storage) and GGUFLinear.

`GGUFExperts` is an experts storage (moekit.moe.storage.ExpertsStorage): it answers the two calls an MoE
layer's dispatcher makes (`kernel_for(x, counts_E)`, `forward(x_SD, rows_E, kernel=...)`), as resident
`Experts` and `QuantizedExperts` do. It holds the raw blocks of a GGUF file (blocks.py), one uint8 row
of blocks per weight row, in file order:

- `w_in_EHB` uint8 [E, H, row_bytes(D)]: the gate rows, then the up rows (H = 2F, as `Experts.w_in_EHD`),
  when gate and up share a block type (`qtype_in`); otherwise `w_gate_EFB` and `w_up_EFB`, each with
  its own type (`qtype_gate`, `qtype_up`), run as two matmuls;
- `w_out_EDB` uint8 [E, D, row_bytes(F)] in `qtype_out`.

`GGUFLinear` stands in for an nn.Linear (attention projections, the head): `weight_OB` uint8
[1, O, row_bytes(I)] (the experts' layout with one expert), the bias kept as it was.

All blocks are buffers (nothing here trains; casting a model's floats leaves them alone). Kernels, by
name (the module's `kernel`, or `kernel=` per call):
- `dequant`: the reference. The active experts' blocks are dequantized to fp32 (blocks.dequantize), then
  the float kernel the resident fp32 layer would pick for these rows runs on them (`loop` when every
  expert has one row, as moekit.moe.experts.choose_kernel decides): a block-format model computes
  exactly what the model dequantized at load computes.
- `native`: moekit.moe.native's compiled kernels read the blocks directly (`gguf_experts`, fused, or two
  `gguf_matmul` calls); they quantize activations to int8 per 32-weight block, so they agree with
  `dequant` to about 1% of the output scale, not bit for bit.
- `auto`: `native` on CPU when native.supports every block type of the module, else `dequant`.

Not here: the block formats (blocks.py), reading a file into these modules (reader.py), the compiled
kernels (moekit.moe.native), offloading's slots (moekit.infer.offload builds them from `GGUFExperts.empty`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..moe import native
from ..moe.experts import activate, bmm_experts, choose_kernel, grouped_mm_experts, loop_experts, native_experts
from ..moe.quantized import NATIVE_MAX_ROWS, StackedShape
from ..moe.storage import ExpertsStorage, check_kernel_name, refuse
from .blocks import BLOCK_TYPES, dequantize, row_bytes

GGUF_KERNELS = ("auto", "native", "dequant")
GGUF_ACTIVATIONS = ("swiglu", "gelu")
_FLOAT_KERNELS = {"loop": loop_experts, "grouped_mm": grouped_mm_experts, "bmm": bmm_experts, "native": native_experts}


def _check_kernel(name: str, owner: str = "GGUFExperts") -> None:
    check_kernel_name(owner, name, GGUF_KERNELS, " for GGUF block weights")


def _check_type(qtype: str, where: str, owner: str = "GGUFExperts") -> None:
    if qtype not in BLOCK_TYPES:
        raise refuse(owner, f"{where}: GGUF type {qtype!r} has no block path; moekit runs {', '.join(BLOCK_TYPES)} as blocks")


def _row_bytes(qtype: str, cols: int, where: str, owner: str = "GGUFExperts") -> int:
    """blocks.row_bytes, with a width that does not split into blocks refused naming the widths accepted."""
    try:
        return row_bytes(qtype, cols, where)
    except ValueError as e:
        raise refuse(owner, f"{e}: accepted widths are multiples of {BLOCK_TYPES[qtype][0]}") from None


def resolve_kernel(name: str, qtypes, device: torch.device, most_rows: int = 1, owner: str = "GGUFExperts") -> str:
    """The kernel a call runs: `auto` -> native on CPU when it runs every type and rows are few
    (NATIVE_MAX_ROWS, as for moekit's own int8/int4), else dequant; `native` where it cannot run -> dequant."""
    _check_kernel(name, owner)
    runs = device.type == "cpu" and all(native.supports(q) for q in qtypes)
    if name == "auto":
        name = "native" if runs and most_rows <= NATIVE_MAX_ROWS else "dequant"
    return name if name != "native" or runs else "dequant"


def _blocks(shape, device) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.uint8, device=device) if str(device) != "meta" else torch.empty(shape, dtype=torch.uint8, device="meta")


class GGUFExperts(StackedShape, ExpertsStorage):
    """E expert MLPs whose stacked weights are GGUF blocks (see the module docstring); zero-filled when built."""

    quantized_weights = True  # its `num_weights` are buffers, not parameters (for parameter counts)
    kernels = GGUF_KERNELS
    _stacked = "w_out_EDB"

    def __init__(self, num_experts: int, hidden_size: int, expert_hidden: int, qtypes: tuple[str, str, str],
                 activation: str = "swiglu", kernel: str = "auto", device: torch.device | str = "cpu"):
        super().__init__()
        _check_kernel(kernel)
        if activation not in GGUF_ACTIVATIONS:
            raise refuse("GGUFExperts", f"experts with activation={activation!r} cannot run from GGUF blocks: accepted "
                         f"activations are {', '.join(GGUF_ACTIVATIONS)} (biased / clamped experts are no GGUF arch moekit reads)")
        E, D, F_ = num_experts, hidden_size, expert_hidden
        for q, what in zip(qtypes, ("gate", "up", "down")):
            _check_type(q, f"the experts' {what} weights")
        self.activation, self.kernel, self.qtypes = activation, kernel, tuple(qtypes)
        self._shape = (E, 2 * F_ if activation == "swiglu" else F_, D, F_)
        gate, up, down = qtypes
        self.fused = activation != "swiglu" or gate == up
        if self.fused:
            self.register_buffer("w_in_EHB", _blocks((E, self._shape[1], _row_bytes(gate, D, "w_in")), device))
        else:
            self.register_buffer("w_gate_EFB", _blocks((E, F_, _row_bytes(gate, D, "w_gate")), device))
            self.register_buffer("w_up_EFB", _blocks((E, F_, _row_bytes(up, D, "w_up")), device))
        self.register_buffer("w_out_EDB", _blocks((E, D, _row_bytes(down, F_, "w_out")), device))

    @classmethod
    def empty(cls, num_experts: int, D: int, F: int, activation: str, qtypes, kernel: str = "auto",
              device: torch.device | str | None = "cpu") -> "GGUFExperts":
        """E experts' blocks, zero-filled on `device` (device="meta": shapes only): what offloading's slots are."""
        return cls(num_experts, D, F, tuple(qtypes), activation, kernel, device or "cpu")

    def kernel_for(self, x: torch.Tensor, counts_E: torch.Tensor | None = None, kernel: str | None = None) -> str:
        """`kernel` (or the module's) with `auto` resolved (native or dequant)."""
        most = int(counts_E.max()) if counts_E is not None and counts_E.numel() else x.shape[0]
        return resolve_kernel(kernel or self.kernel, self.qtypes, x.device, most)

    def forward(self, x_ND: torch.Tensor, rows_E: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        """x_ND holds rows_E[e] consecutive rows per expert; returns [N, D] in x's dtype."""
        name = self.kernel_for(x_ND, rows_E, kernel)
        if name == "native":
            return self._native(x_ND, rows_E).to(x_ND.dtype)
        return self._dequant(x_ND, rows_E).to(x_ND.dtype)

    def dequantized(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's fp32 (w_in [H, D], w_out [D, F])."""
        if self.fused:
            w_in = dequantize(self.w_in_EHB[e], self.qtypes[0])
        else:
            w_in = torch.cat((dequantize(self.w_gate_EFB[e], self.qtypes[0]), dequantize(self.w_up_EFB[e], self.qtypes[1])))
        return w_in, dequantize(self.w_out_EDB[e], self.qtypes[2])

    def _dequant(self, x_ND: torch.Tensor, rows_E: torch.Tensor) -> torch.Tensor:
        active = [e for e, c in enumerate(rows_E.tolist()) if c]
        E, H, D, F_ = self._shape
        if not active:
            return x_ND.new_zeros(0, D, dtype=torch.float32)
        w_in_AHD = torch.empty(len(active), H, D, device=x_ND.device)
        w_out_ADF = torch.empty(len(active), D, F_, device=x_ND.device)
        for i, e in enumerate(active):
            w_in_AHD[i], w_out_ADF[i] = self.dequantized(e)
        x, counts_A = x_ND.float(), rows_E[active]
        name = choose_kernel(x, w_in_AHD, w_out_ADF, counts_A, self.activation)  # the fp32 model's own choice
        return _FLOAT_KERNELS[name](x, counts_A, w_in_AHD, w_out_ADF, self.activation)

    def _native(self, x_ND: torch.Tensor, rows_E: torch.Tensor) -> torch.Tensor:
        groups, x = native.groups_of(rows_E), x_ND.float().contiguous()
        gate, up, down = self.qtypes
        if self.fused:
            y = native.gguf_experts(x, self.w_in_EHB, gate, self.w_out_EDB, down, groups, self.activation)
            if y is not None:
                return y
            h = native.gguf_matmul(x, self.w_in_EHB, gate, groups)
        else:
            h = torch.cat((native.gguf_matmul(x, self.w_gate_EFB, gate, groups),
                           native.gguf_matmul(x, self.w_up_EFB, up, groups)), dim=-1)
        return native.gguf_matmul(activate(h, self.activation).contiguous(), self.w_out_EDB, down, groups)

    def extra_repr(self) -> str:
        E, H, D, F_ = self._shape
        return f"experts={E}, hidden={D}, expert_hidden={F_}, types={'/'.join(self.qtypes)}, kernel={self.kernel}"


class GGUFLinear(nn.Module):
    """An nn.Linear whose weight is GGUF blocks (`weight_OB` uint8 [1, O, row_bytes], type `qtype`); bias kept."""

    quantized_weights = True

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: torch.Tensor | None = None,
                 kernel: str = "auto", device: torch.device | str = "cpu", what: str = "a Linear"):
        super().__init__()
        _check_kernel(kernel, "GGUFLinear")
        _check_type(qtype, what, "GGUFLinear")
        self.in_features, self.out_features, self.qtype, self.kernel = in_features, out_features, qtype, kernel
        self.register_buffer("weight_OB", _blocks((1, out_features, row_bytes(qtype, in_features, what)), device))
        self.bias = bias

    @property
    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [O, I]."""
        return dequantize(self.weight_OB[0], self.qtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x_NI = x.reshape(-1, self.in_features).float()
        bias = None if self.bias is None else self.bias.float()
        if resolve_kernel(self.kernel, (self.qtype,), x.device, x_NI.shape[0], "GGUFLinear") == "native":
            y = native.gguf_matmul(x_NI.contiguous(), self.weight_OB, self.qtype, None)  # None: every row
            y = y if bias is None else y + bias
        else:
            y = F.linear(x_NI, self.dequantized(), bias)  # (as nn.Linear: the same arithmetic as the dequantized model)
        return y.to(x.dtype).view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype}, kernel={self.kernel}"
