"""FP8 block-quantized checkpoints (DeepSeek-V3's format): dequantization on load.

DeepSeek-V3 ships most weight matrices as float8_e4m3fn with a float32
`<name>_scale_inv` beside each (e.g. `q_a_proj.weight_scale_inv`), one
number per block of `weight_block_size` (128 x 128) elements: the real
weight is `weight * scale_inv`, each scale covering its block (the last
blocks of a row or column may be partial). config.json says so with
`quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128], ...}`.

Here: `block_size` (read and check that entry), `scale_name`, `dequantize`.
Not here: which tensors a model needs (families.py, deepseek.py), reading
files (reader.py).
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def block_size(hf: dict, where: str) -> tuple[int, int] | None:
    """The FP8 block shape a config.json declares; None when the checkpoint is not FP8-block-quantized."""
    q = hf.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        return None
    block = q.get("weight_block_size") or list(DEFAULT_BLOCK)
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise CheckpointError(f"{where}: quantization_config.weight_block_size={block!r} must be two positive integers")
    return int(block[0]), int(block[1])


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str = "weight") -> torch.Tensor:
    """weight (float8, [R, C]) * scale_inv ([ceil(R/br), ceil(C/bc)]) spread over its blocks, in float32."""
    if weight.dim() != 2:
        raise CheckpointError(f"FP8 tensor {name} has {weight.dim()} dimensions; block scales need a matrix")
    (R, C), (br, bc) = weight.shape, block
    want = (-(-R // br), -(-C // bc))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"{name}{SCALE_SUFFIX} has shape {list(scale_inv.shape)} but a [{R}, {C}] weight in "
                              f"{br}x{bc} blocks needs {list(want)}")
    scale = scale_inv.float().repeat_interleave(br, 0)[:R].repeat_interleave(bc, 1)[:, :C]
    return weight.float() * scale
