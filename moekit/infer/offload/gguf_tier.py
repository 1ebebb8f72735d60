"""The GGUF tier: experts read one at a time from a GGUF file's memory map and dequantized with gguf's routines.

gguf.GGUFReader maps the file (np.memmap); a stacked expert tensor's first axis is the expert, so one
expert's block (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`: F32, F16, Q8_0, Q4_0, Q4_K, ...) is read
from the page cache (or the disk) only when that expert is loaded into a slot. The slots hold full
precision (gate rows, then up rows, as moekit's w_in); a quantized model wraps this tier in
requant.ConvertingTier. A read returns, and `read_bytes` tells the offloader's "bytes moved", the bytes
taken from the file (the GGUF's own packed size), not the full-precision slot's.

Not here: the GGUF format and metadata (moekit.gguf), other tiers (tiers.py, disk.py).
"""

from __future__ import annotations

import re
from pathlib import Path

from .budget import LayerShape, OffloadError
from .tiers import SlowTier


class GGUFTier(SlowTier):
    """Full-precision experts of a GGUF MoE file, dequantized per expert from its memory map."""

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
            self.layers.append(tensors)

    def read(self, layer, expert, *dst):
        from ...gguf.reader import dequantize_expert

        dst_in_HD, dst_out_DF = dst
        t = self.layers[layer]
        F = dst_out_DF.shape[1]
        dst_in_HD[:F].copy_(dequantize_expert(t["gate"], expert))
        dst_in_HD[F:].copy_(dequantize_expert(t["up"], expert))
        dst_out_DF.copy_(dequantize_expert(t["down"], expert))
        return self.read_bytes(layer, expert)

    def read_bytes(self, layer, expert):
        """The expert's bytes in the file: its gate, up and down blocks as stored (quantized: the packed blocks)."""
        return sum(int(t.data[expert].nbytes) for t in self.layers[layer].values())

    def close(self) -> None:
        self._reader = None
        self.layers = []
