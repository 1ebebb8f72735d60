"""The low-bit fallback (HOBBIT): a resident int4 copy of every expert, to compute a miss instead of waiting for it.

With `offload_model(..., low_bit_fallback=True)` (CLI `--low-bit-fallback`) every MoE layer keeps, beside
its fast slots, all of its experts quantized to int4 (group 32, symmetric; moekit.moe.quant_format) in
fast memory: about 1/7 of their fp32 bytes. When the router picks an expert that is neither in a slot nor
on its way there (a miss at the moment the gate fires), the layer computes that expert from its int4 copy
with the quantized kernels (QuantizedExperts: dequantize-then-matmul is the oracle) instead of stalling,
and the full copy is loaded in the background as a prefetch would be, so the next use is exact again.
Each such computation is counted (`fallbacks` in the offload statistics). The choice is made when the
gate fires, not by racing the transfer, so a run is reproducible.

Not here: the decision and the computation (offloader.py), the formats and kernels (moekit.moe).
"""

from __future__ import annotations

import torch

from ...moe.quant_format import QuantSpec, check_width
from ...moe.quantized import QuantizedExperts
from .budget import LayerShape, OffloadError
from .experts import slot_parts
from .requant import ConvertingTier
from .tiers import SlowTier

FALLBACK_SPEC = QuantSpec(bits=4, group_size=32)


def check_fallback_widths(shapes: list[LayerShape]) -> None:
    """The int4 copy needs group 32 to divide every expert's input widths (D for w_in, F for w_out)."""
    for j, s in enumerate(shapes):
        try:
            check_width(FALLBACK_SPEC, s.D, f"the experts' w_in of MoE layer {j}")
            check_width(FALLBACK_SPEC, s.F, f"the experts' w_out of MoE layer {j}")
        except Exception as e:
            raise OffloadError(f"the low-bit fallback keeps an int4 (group 32) copy of every expert, but {e}") from None


def build_fallback(tier: SlowTier, moe_layers, shapes: list[LayerShape], device: torch.device) -> list[QuantizedExperts]:
    """Per MoE layer, every expert as int4 in fast memory, read one expert at a time from the slow tier."""
    int4 = [s.quantized(FALLBACK_SPEC) for s in shapes]
    convert = ConvertingTier(tier, shapes, int4)
    copies = []
    for j, ((_, m), shape) in enumerate(zip(moe_layers, int4)):
        copy = QuantizedExperts.empty(shape.num_experts, shape.D, shape.F, m.experts.activation, FALLBACK_SPEC, "auto", device)
        parts = slot_parts(copy, shape)
        for e in range(shape.num_experts):
            convert.read(j, e, *(t[e] for t in parts))
        copies.append(copy)
    return copies


def fallback_bytes(copies: list[QuantizedExperts] | None) -> int:
    """Fast-memory bytes the int4 copies take."""
    return sum(b.numel() * b.element_size() for c in copies or [] for b in c.buffers())
