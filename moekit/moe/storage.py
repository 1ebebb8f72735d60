"""The experts-storage interface: what every storage of a layer's experts offers the MoE layer.

An MoE layer's dispatcher (dispatch.LocalDispatcher, parallel's AllToAllDispatcher) makes exactly two
calls on its experts, whatever they are:

    kernel = experts.kernel_for(x_TD, counts_E)        # the kernel a call would run, `auto` resolved
    y_ND   = experts(x_ND, rows_E, kernel=kernel)      # rows_E[e] consecutive rows per expert -> [N, D]

`ExpertsStorage` is the small base class that states this contract, with the shape properties parameter
counts, offloading and quantization read (`shape_EHDF` = (experts, w_in rows H, hidden D, expert width
F), `num_experts`, `num_weights`), the activation by name (`activation`: one of ACTIVATIONS), whether the
experts carry biases (`has_bias`), the kernel names it accepts (`kernels`) and its default (`kernel`).
Every result equals the `loop` kernel of resident `Experts` on the storage's own effective weights
(dequantized, for quantized and GGUF storages; to the int8 rounding of activations for the integer-dot
kernels), held by tests/test_experts_conformance.py, which fails when a subclass lands without its row.

A combination a storage cannot compute (an activation, a width, a kernel name, biases) is refused at
construction with one ConfigError made by `refuse`, naming the storage, the combination and what is
accepted. Kernels that only cannot run *here* (no vector build, no numba, a GPU) fall back to the
storage's reference kernel instead: the result is the same.

The storages: `Experts` (experts.py: resident, and the expert-parallel shards, which keep the local
experts' slice of the same tensors), `QuantizedExperts` (quantized.py: int8 / int4), `GGUFExperts`
(moekit.gguf.storage), `OffloadedExperts` (moekit.infer.offload.experts: fast slots of any of these,
and the low-bit fallback's int4 copies). moefy's encoder experts are an `Experts` with biases. Not here:
the kernels (experts.py, quantized.py, native.py), moving tokens (dispatch.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError

ACTIVATIONS = ("swiglu", "gelu", "clamped_swiglu")


def refuse(storage: str, message: str) -> ConfigError:
    """The one error a storage raises for a combination it cannot compute: "<storage>: <message>".

    message names the combination and what is accepted (e.g. "activation='clamped_swiglu' cannot run
    from GGUF blocks: accepted activations are swiglu, gelu").
    """
    return ConfigError(f"{storage}: {message}")


def check_kernel_name(storage: str, name: str, kernels: tuple[str, ...], what: str = "") -> None:
    """A kernel name the storage does not know: refused naming the ones it accepts."""
    if name not in kernels:
        raise refuse(storage, f"kernel={name!r} is unknown{what}: accepted values are {', '.join(kernels)}")


class ExpertsStorage(nn.Module):
    """Where and how a layer's E expert MLPs live; the two calls every MoE layer makes (module docstring).

    Subclasses set `kernels` (the names they accept), `kernel` (their default), `activation` (a name in
    ACTIVATIONS) and implement `shape_EHDF`, `kernel_for` and `forward`.
    """

    kernels: tuple[str, ...] = ()
    kernel: str
    activation: str

    @property
    def shape_EHDF(self) -> tuple[int, int, int, int]:
        """(experts, w_in rows H: 2F for the gated activations else F, hidden D, expert width F)."""
        raise NotImplementedError

    @property
    def num_experts(self) -> int:
        return self.shape_EHDF[0]

    @property
    def num_weights(self) -> int:
        """Weights of all experts, counted as resident floats (for parameter counts)."""
        E, H, D, F = self.shape_EHDF
        return E * (H * D + D * F)

    @property
    def has_bias(self) -> bool:
        """Whether the experts carry biases (GPT-OSS; moefy's encoder experts)."""
        return False

    def kernel_for(self, x: torch.Tensor, counts_E: torch.Tensor | None = None, kernel: str | None = None) -> str:
        """The kernel a call would run: `kernel` (or the storage's) with `auto` resolved.

        x lends its dtype, device and (without counts) its row count."""
        raise NotImplementedError

    def forward(self, x_ND: torch.Tensor, rows_E: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        """x_ND holds rows_E[e] consecutive rows per expert (compact or padded); returns [N, D] in x's dtype."""
        raise NotImplementedError

