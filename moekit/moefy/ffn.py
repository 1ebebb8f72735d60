"""A dense FFN seen as F neurons: read its weights, compute its neuron activations, slice it.

`FFNWeights` is the neutral view every conversion method works on: the input
rows of each neuron (SwiGLU: gate and up rows; GELU: one row), optional
biases, and the output columns. `neuron_acts` gives the activations at the
down-projection input ([T, F]), `slice_in` / `slice_out` the stacked expert
weights in moekit's `Experts` layout (gate rows then up rows). Neither
partitions nor builds models (partition.py, decoder.py, encoder.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .spec import MoefyError


@dataclass
class FFNWeights:
    activation: str  # swiglu | gelu
    w_gate_FD: torch.Tensor | None  # SwiGLU only
    w_up_FD: torch.Tensor
    w_down_DF: torch.Tensor
    b_up_F: torch.Tensor | None = None  # BERT-style biases (GELU)
    b_down_D: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.w_up_FD.shape[0]

    def input_rows(self) -> torch.Tensor:
        """[F, D or 2D] each neuron's input weights (gate and up concatenated for SwiGLU)."""
        if self.w_gate_FD is None:
            return self.w_up_FD
        return torch.cat([self.w_gate_FD, self.w_up_FD], dim=1)


def ffn_weights(mlp) -> FFNWeights:
    """The FFNWeights of a moekit SwiGLU / GeluMLP or a BERT (intermediate, output) pair."""
    if hasattr(mlp, "gate_proj"):
        return FFNWeights("swiglu", mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach())
    if hasattr(mlp, "up_proj"):
        return FFNWeights("gelu", None, mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach(),
                          _bias(mlp.up_proj), _bias(mlp.down_proj))
    raise MoefyError(f"{type(mlp).__name__} is not a dense FFN moefy can split (SwiGLU or GELU MLP)")


def _bias(linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def neuron_acts(fw: FFNWeights, x_TD: torch.Tensor) -> torch.Tensor:
    """[T, F] the activations that multiply the down projection's columns."""
    up = F.linear(x_TD, fw.w_up_FD, fw.b_up_F)
    if fw.activation == "swiglu":
        return F.silu(F.linear(x_TD, fw.w_gate_FD)) * up
    return F.gelu(up)


def slice_in(fw: FFNWeights, idx_W: torch.Tensor) -> torch.Tensor:
    """[H, D] the input rows of neurons idx (SwiGLU: gate rows then up rows, H = 2W)."""
    if fw.w_gate_FD is None:
        return fw.w_up_FD[idx_W]
    return torch.cat([fw.w_gate_FD[idx_W], fw.w_up_FD[idx_W]])


def slice_out(fw: FFNWeights, idx_W: torch.Tensor) -> torch.Tensor:
    """[D, W] the output columns of neurons idx."""
    return fw.w_down_DF[:, idx_W]
