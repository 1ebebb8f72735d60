"""Slow tiers made from another tier, one expert at a time: quantizing on read, a spill file, stacked host copies.

- `ConvertingTier(source, source_shapes, shapes)`: each read takes the expert from `source` in its own
  form (full precision, GGUF-dequantized, or another quantization), dequantizes it to fp32 and stores it in
  `shapes`' form (moekit.moe.quant_format.quantize). How `Engine.load(..., quantize="int4",
  expert_budget=...)` quantizes experts as they are read, never holding them all in full precision.
- `spill(source, module_paths, shapes, directory)`: a safetensors file holding every expert in `shapes`'
  form, written one expert at a time (positional writes into a preallocated file), and a `DiskTier` that
  reads it (the file is unlinked once the tier has it open, so it vanishes with the tier or the process): the disk tier of quantized experts whose checkpoint holds them
  in full precision (a miss then reads the packed bytes, not the fp32 ones).
- `gather(source, shapes)`: stacked [E, ...] host tensors per part (a MemoryTier's weights; the low-bit
  fallback's resident int4 copy), read one expert at a time.

Not here: the tiers themselves (tiers.py, disk.py, gguf_tier.py), choosing among them (transform.py).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from ...moe.quant_format import dequantize, quantize, stored_names
from .budget import LayerShape
from .disk import DiskTier
from .tiers import SlowTier

_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8", torch.uint8: "U8"}


def expert_weights(parts: list[torch.Tensor], shape: LayerShape) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's fp32 (w_in [H, D], w_out [D, F]) from its stored parts (dequantized when quantized)."""
    if shape.gguf is not None:  # GGUF blocks: [gate | up] rows (or gate, up apart), then down
        from ...gguf.blocks import dequantize as blocks

        gate, up, down = shape.gguf
        w_in = blocks(parts[0], gate) if len(parts) == 2 else torch.cat((blocks(parts[0], gate), blocks(parts[1], up)))
        return w_in, blocks(parts[-1], down)
    if shape.spec is None:
        return parts[0].float(), parts[1].float()
    names = stored_names(shape.spec)
    n = len(names)
    w_in = dequantize(dict(zip(names, parts[:n])), shape.spec)
    return w_in, dequantize(dict(zip(names, parts[n:])), shape.spec)


def expert_parts(w_in_HD: torch.Tensor, w_out_DF: torch.Tensor, shape: LayerShape) -> list[torch.Tensor]:
    """One expert's stored parts in `shape`'s form, in LayerShape.parts() order."""
    if shape.spec is None:
        return [w_in_HD.to(shape.dtype), w_out_DF.to(shape.dtype)]
    names = stored_names(shape.spec)
    q_in, q_out = quantize(w_in_HD, shape.spec), quantize(w_out_DF, shape.spec)
    return [q_in[n] for n in names] + [q_out[n] for n in names]


def staging(shape: LayerShape) -> list[torch.Tensor]:
    """Empty host tensors for one expert's parts."""
    return [torch.empty(s, dtype=d) for _, s, d in shape.parts()]


class ConvertingTier(SlowTier):
    """`source`'s experts (in `source_shapes`' form) stored in `shapes`' form as they are read."""

    def __init__(self, source: SlowTier, source_shapes: list[LayerShape], shapes: list[LayerShape]):
        self.source, self.source_shapes, self.shapes = source, source_shapes, shapes
        self.kind = source.kind
        names = {s.spec.name if s.spec else str(s.dtype).removeprefix("torch.") for s in shapes}
        self.label = f"{source.label}, stored as {', '.join(sorted(names))} on read"

    def read(self, layer, expert, *dst):
        parts = staging(self.source_shapes[layer])
        self.source.read(layer, expert, *parts)
        w_in, w_out = expert_weights(parts, self.source_shapes[layer])
        for target, value in zip(dst, expert_parts(w_in, w_out, self.shapes[layer]), strict=True):
            target.copy_(value)
        return sum(t.numel() * t.element_size() for t in dst)

    def close(self) -> None:
        self.source.close()


def gather(source: SlowTier, shapes: list[LayerShape]) -> list[tuple[torch.Tensor, ...]]:
    """Every expert of `source` as stacked [E, ...] host tensors per part, read one expert at a time."""
    out = []
    for j, shape in enumerate(shapes):
        stacked = tuple(torch.empty((shape.num_experts, *s), dtype=d) for _, s, d in shape.parts())
        for e in range(shape.num_experts):
            source.read(j, e, *(t[e] for t in stacked))
        out.append(stacked)
    return out


def spill(source: SlowTier, module_paths: list[str], shapes: list[LayerShape], directory: str | Path | None = None) -> DiskTier:
    """A DiskTier over a new safetensors file of `source`'s experts in `shapes`' form (unlinked once open)."""
    header, at = {}, 0
    for path, shape in zip(module_paths, shapes):
        for name, s, dtype in shape.parts():
            nbytes = shape.num_experts * math.prod(s) * dtype.itemsize
            header[f"{path}.experts.{name}"] = {"dtype": _ST_NAMES[dtype], "shape": [shape.num_experts, *s],
                                                "data_offsets": [at, at + nbytes]}
            at += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    fd, name = tempfile.mkstemp(prefix="moekit-experts-", suffix=".safetensors", dir=directory)
    try:
        os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(fd, start + at)
        for j, (path, shape) in enumerate(zip(module_paths, shapes)):
            parts = staging(shape)
            for e in range(shape.num_experts):
                source.read(j, e, *parts)
                for (part, _, _), t in zip(shape.parts(), parts):
                    begin, end = header[f"{path}.experts.{part}"]["data_offsets"]
                    per = (end - begin) // shape.num_experts
                    os.pwrite(fd, t.contiguous().view(torch.uint8).numpy().tobytes(), start + begin + e * per)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        Path(name).unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        tier = DiskTier(name, module_paths, shapes, owned=True)  # (unlinks it once open)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    kinds = sorted({s.spec.name if s.spec else str(s.dtype).removeprefix("torch.") for s in shapes})
    tier.label = f"disk (spill file {name}: {', '.join(kinds)} experts from {source.label})"
    return tier
