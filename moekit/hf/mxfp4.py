"""MXFP4 (OCP microscaling FP4) weights as GPT-OSS checkpoints store its experts, dequantized on load.

A weight of R output rows and C input columns is stored as `blocks` [.., R, C/32, 16]
uint8 (two 4-bit e2m1 values per byte, the low nibble first) and `scales`
[.., R, C/32] uint8 (one e8m0 exponent per block of 32 values, bias 127):
value = FP4_VALUES[nibble] * 2 ** (scale - 127).

Not here: which tensors are MXFP4 and where they go (families_more.py),
quantizing (moekit never writes MXFP4).
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError

# e2m1: sign, 2 exponent bits, 1 mantissa bit
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[.., R, G, 16] uint8 blocks and [.., R, G] uint8 scales -> [.., R, G * 32] values in `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise CheckpointError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise CheckpointError(
            f"MXFP4 blocks of shape {list(blocks.shape)} do not fit scales of shape {list(scales.shape)} "
            f"(expected blocks [..., G, 16] and scales [..., G])"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    lo, hi = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
    values = torch.stack([lo, hi], dim=-1).flatten(-2)  # [.., R, G, 32]
    exponents = scales.to(torch.int32) - 127
    out = torch.ldexp(values, exponents[..., None])
    return out.flatten(-2).to(dtype)
