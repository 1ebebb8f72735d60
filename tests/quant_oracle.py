"""Test oracle for the native integer-dot kernels: what they do to activations, written independently.

The kernels (moekit/moe/_qdot.c) round each activation row to int8 per 32-value block, with scale
absmax / 127, before their integer dot products. `fake_quant_rows` does the same rounding in torch, so
dequantize-the-weights + fake_quant_rows + an fp32 matmul is the reference the kernels must equal to
fp32 accumulation order.
"""

from __future__ import annotations

import torch


def fake_quant_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., I] (I a multiple of 32) with each 32-value block rounded to int8 codes and scaled back."""
    xb = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    codes = torch.round(xb * inv)
    return (codes * (amax / 127.0)).reshape(x.shape)
