"""The GGUF tier: experts read one at a time from a GGUF file's memory map, as blocks or dequantized.

gguf.GGUFReader maps the file (np.memmap); a stacked expert tensor's first axis is the expert, so one
expert's block (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`: F32, F16, Q8_0, Q4_0, Q4_K, ...) is read
from the page cache (or the disk) only when that expert is loaded into a slot. Block experts (the layer's
LayerShape has `gguf` types: the model was loaded in block format, moekit.gguf.storage.GGUFExperts) are
copied into the slots as they are; otherwise the slots hold full precision (gate rows, then up rows, as
moekit's w_in), dequantized by gguf, and a quantized model wraps this tier in requant.ConvertingTier. A
read returns, and `read_bytes` tells the offloader's "bytes moved", the bytes taken from the file (the
GGUF's own packed size), not the full-precision slot's.

Not here: the GGUF format and metadata (moekit.gguf), other tiers (tiers.py, disk.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import ctypes

import numpy as np
import torch

from .budget import LayerShape, OffloadError, SlowTierError
from .tiers import SlowTier


def _copy_from_map(dst: torch.Tensor, src: np.ndarray, name: str) -> None:
    """One memcpy from the file's memory map into a slot (no GIL-holding torch op, no writable-array warning)."""
    if src.nbytes != dst.numel() * dst.element_size():
        raise SlowTierError(f"GGUF tensor {name}: an expert's blocks are {src.nbytes} bytes but the slot holds "
                            f"{dst.numel() * dst.element_size()}")
    if dst.device.type == "cpu" and dst.is_contiguous():
        ctypes.memmove(dst.data_ptr(), src.ctypes.data, src.nbytes)
    else:
        dst.copy_(torch.from_numpy(np.array(src)).view(dst.shape))


class GGUFTier(SlowTier):
    """The experts of a GGUF MoE file, per expert from its memory map: raw blocks, or dequantized to full precision."""

    kind = "gguf"

    def __init__(self, path: str | Path, module_paths: list[str], shapes: list[LayerShape]):
        from ...gguf.reader import expert_tensors, open_gguf

        self.path = Path(path)
        self.label = f"GGUF memory map ({self.path})"
        self._reader = open_gguf(self.path)
        self.layers = []
        for module_path, shape in zip(module_paths, shapes):
            m = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.mlp", module_path)
            if m is None or shape.spec is not None or shape.H != 2 * shape.F:
                raise OffloadError(f"{self.path.name}: MoE layer {module_path!r} cannot be read from a GGUF file "
                                   f"(GGUF experts are gated full-precision blocks blk.N.ffn_*_exps)")
            tensors = expert_tensors(self._reader, int(m.group(1)))
            want = {"gate": (shape.num_experts, shape.F, shape.D), "up": (shape.num_experts, shape.F, shape.D),
                    "down": (shape.num_experts, shape.D, shape.F)}
            for key, t in tensors.items():
                got = tuple(int(s) for s in reversed(t.shape.tolist()))
                if got != want[key]:
                    raise OffloadError(f"{self.path.name}: {t.name} has shape {list(got)} but the model expects {list(want[key])}")
            types = tuple(t.tensor_type.name for t in tensors.values())
            if shape.gguf is not None and types != shape.gguf:
                raise OffloadError(f"{self.path.name}: the experts of {module_path} are stored as {'/'.join(types)} but the "
                                   f"model holds {'/'.join(shape.gguf)} blocks: offload from the file the model was loaded from")
            self.layers.append(tensors)
        self.blocks = [shape.gguf is not None for shape in shapes]

    def read(self, layer, expert, *dst):
        from ...gguf.reader import dequantize_expert

        t = self.layers[layer]
        if self.blocks[layer]:
            return self._read_blocks(t, expert, dst)
        dst_in_HD, dst_out_DF = dst
        F = dst_out_DF.shape[1]
        dst_in_HD[:F].copy_(dequantize_expert(t["gate"], expert))
        dst_in_HD[F:].copy_(dequantize_expert(t["up"], expert))
        dst_out_DF.copy_(dequantize_expert(t["down"], expert))
        return self.read_bytes(layer, expert)

    def _read_blocks(self, t, expert, dst) -> int:
        """The expert's raw blocks into GGUFExperts slots: [gate | up] rows (or gate, up apart), then down."""
        sources = [t["gate"], t["up"], t["down"]]
        if len(dst) == 2:
            F = t["gate"].data.shape[1]
            targets = [dst[0][:F], dst[0][F:], dst[1]]
        else:
            targets = list(dst)
        for target, src in zip(targets, sources, strict=True):
            _copy_from_map(target, src.data[expert], src.name)
        return sum(int(src.data[expert].nbytes) for src in sources)

    def read_bytes(self, layer, expert):
        """The expert's bytes in the file: its gate, up and down blocks as stored (quantized: the packed blocks)."""
        return sum(int(t.data[expert].nbytes) for t in self.layers[layer].values())

    def close(self) -> None:
        self._reader = None
        self.layers = []
