"""OffloadedExperts: the experts storage of an offloaded MoE layer (S fast slots filled from a slow tier).

It answers the same two calls as resident `Experts` (`kernel_for`, `forward`),
so the MoE layer and its dispatcher run unchanged. Its slots are an `Experts`
(full precision) or a `QuantizedExperts` (int8 / int4: the layer's LayerShape
has a spec), so quantized experts compute through the same quantized kernels
as the resident quantized model; GGUF block experts (the layer's LayerShape has `gguf` types) have
`GGUFExperts` slots (moekit.gguf.storage) holding the file's blocks as they are. Experts with biases
(GPT-OSS) are refused (`check_offloadable`): the tiers move only the stacked weights. Not here: fetching
and caching (offloader.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ...meta import empty_on, on_meta
from ...moe.experts import Experts
from ...moe.quantized import QuantizedExperts
from ...moe.storage import ExpertsStorage, refuse
from .budget import LayerShape


# ---------------------------------------------------------------- the offloaded experts


def check_offloadable(experts: ExpertsStorage, where: str) -> None:
    """Experts with biases are refused by name: slow tiers and fast slots hold only the stacked weights."""
    if experts.has_bias:
        raise refuse("OffloadedExperts", f"the experts of {where} carry biases, which expert offloading does not move "
                                         f"(GPT-OSS models cannot be offloaded yet); accepted: experts without biases "
                                         f"(run this model resident)")


class OffloadedExperts(ExpertsStorage):
    """Stands in for a layer's `Experts`: S fast slots, filled on demand by the offloader.

    `forward` is the `Experts` call every MoE layer makes (training, prefill and
    decode alike): the router's hook has already started fetching the chosen
    experts; forward waits for them and computes on their slots with the kernel
    the resident layer would pick, so the arithmetic (and the tokens) is unchanged.
    """

    def __init__(self, offloader, layer: int, full_shape: LayerShape, activation: str, kernel: str):
        super().__init__()
        self.slots: Experts | None = None
        self.layer = layer
        self.kernel = kernel
        self.activation = activation
        self._offloader = offloader
        self._shape = full_shape
        # A weightless stand-in of the resident experts: kernel choices are made exactly as they would be.
        self._resident = _make_slots(full_shape.num_experts, full_shape, activation, "meta", kernel)

    @property
    def kernels(self) -> tuple[str, ...]:
        return self._resident.kernels

    @property
    def shape_EHDF(self) -> tuple[int, int, int, int]:
        s = self._shape
        return s.num_experts, s.H, s.D, s.F

    def kernel_for(self, x: torch.Tensor, counts_E: torch.Tensor | None = None, kernel: str | None = None) -> str:
        """The kernel the resident layer would run for this input (so results are bit-identical)."""
        return self._resident.kernel_for(x, counts_E, kernel)

    def forward(self, x_ND: torch.Tensor, rows_E: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        """Like Experts.forward: x_ND holds rows_E[e] consecutive rows per expert (compact or padded)."""
        name = kernel if kernel not in (None, "auto") else self.kernel_for(x_ND, rows_E, kernel)
        return self._offloader._compute(self.layer, x_ND, rows_E, name)


def _make_slots(n: int, shape: LayerShape, activation: str, device, kernel: str = "loop") -> Experts | QuantizedExperts:
    """n experts' storage of the layer's kind, zero-filled on `device` (device="meta": a weightless stand-in)."""
    if shape.gguf is not None:
        from ...gguf.storage import GGUFExperts

        return GGUFExperts.empty(n, shape.D, shape.F, activation, shape.gguf, _gguf_kernel(kernel), device)
    if shape.spec is not None:
        return QuantizedExperts.empty(n, shape.D, shape.F, activation, shape.spec, kernel, device)
    with on_meta():  # (not torch.device("meta"): computing on meta imports torch._dynamo, see moekit.meta)
        slots = Experts(n, shape.D, shape.F, activation=activation, kernel=kernel)
    if str(device) == "meta":
        return slots
    slots = empty_on(slots, device, shape.dtype)
    for p in slots.parameters():
        p.requires_grad_(False)
        p.data.zero_()
    return slots


def _gguf_kernel(kernel: str) -> str:
    """The resident layer's kernel name as the GGUF slots take it (a float kernel name: their `auto`)."""
    from ...gguf.storage import GGUF_KERNELS

    return kernel if kernel in GGUF_KERNELS else "auto"


def slot_parts(slots: nn.Module, shape: LayerShape) -> list[torch.Tensor]:
    """The stacked [S, ...] tensors of a slots module, in LayerShape.parts() order (what tiers read into)."""
    return [getattr(slots, name).data for name, _, _ in shape.parts()]
