"""The disk tier: experts read with positional reads from the checkpoint's safetensors files.

The header of each file is parsed once (`read_safetensors_header`); each
expert is read straight into its slot and the page cache for those bytes is
dropped (posix_fadvise DONTNEED), so a later miss is a real read. Every read
checks that the file is still the one opened. Not here: other tiers (tiers.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .budget import LayerShape, OffloadError, SlowTierError, _itemsize
from .tiers import SlowTier
from ...checkpoints import safetensors_header


# ---------------------------------------------------------------- the disk tier

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I8": torch.int8, "U8": torch.uint8}  # (the integer ones: quantized experts' codes and zero points)


@dataclass
class _TensorEntry:
    file: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class _Segment:
    """Bytes of one expert in a file -> bytes of its slot (`dst`: the index of the part, at a byte offset)."""

    file: int
    offset: int
    nbytes: int
    dtype: torch.dtype
    dst: int
    dst_offset: int


def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[str, list[int], int, int]], int]:
    """({name: (dtype, shape, begin, end)}, data start) without reading any tensor data."""
    try:
        entries, start, _ = safetensors_header(path)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SlowTierError(f"{path} is not a readable safetensors file: {e}") from None
    return entries, start


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors file(s) of a checkpoint: a file, a directory with model.safetensors or a sharded index, or a moekit run."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise OffloadError(f"{p} is not a .safetensors file: the disk tier reads experts from safetensors checkpoints")
        return [p]
    if not p.is_dir():
        raise OffloadError(f"checkpoint path {p} does not exist")
    if (p / "model.safetensors").is_file():
        return [p / "model.safetensors"]
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise OffloadError(f"{indexes[0]} is not a valid safetensors index: {e}") from None
        return [p / name for name in sorted(set(weight_map.values()))]
    from ...checkpoints import resolve_checkpoint

    return checkpoint_files(resolve_checkpoint(p))


class DiskTier(SlowTier):
    """Experts read from safetensors file(s) on disk, page cache dropped after each read."""

    kind = "disk"

    def __init__(self, checkpoint: str | Path, module_paths: list[str], shapes: list[LayerShape], drop_cache: bool = True,
                 owned: bool = False):
        self.files = checkpoint_files(checkpoint)
        self.drop_cache = drop_cache
        self.owned = owned  # a spill file (requant.py): unlinked once open, so it goes when the tier (or the process) does
        self.label = f"disk ({self.files[0].parent if len(self.files) > 1 else self.files[0]})"
        self._fds: list[int] = []
        self._signatures: list[tuple] = []
        entries: dict[str, _TensorEntry] = {}
        for i, path in enumerate(self.files):
            header, start = read_safetensors_header(path)
            for name, (dtype, shape, begin, end) in header.items():
                if dtype in _ST_DTYPES:
                    entries[name] = _TensorEntry(i, _ST_DTYPES[dtype], tuple(shape), start + begin, end - begin)
            fd = os.open(path, os.O_RDONLY)
            self._fds.append(fd)
            self._signatures.append(_signature(os.fstat(fd)))
        self.layouts = [_expert_layout(entries, p, s, self.files) for p, s in zip(module_paths, shapes)]
        self.shapes = shapes
        for fd in self._fds:
            self._fadvise(fd, 0, 0)
        if owned:
            for path in self.files:
                path.unlink(missing_ok=True)

    def read(self, layer, expert, *dst):
        total = 0
        for seg in self.layouts[layer][expert]:
            target = dst[seg.dst]
            if seg.dtype == target.dtype and target.device.type == "cpu":
                view = target.reshape(-1).view(torch.uint8)[seg.dst_offset : seg.dst_offset + seg.nbytes]
                self._pread(seg.file, view, seg.offset)
            else:  # another dtype (or device): read into a staging buffer, then convert
                staging = torch.empty(seg.nbytes, dtype=torch.uint8)
                self._pread(seg.file, staging, seg.offset)
                values = staging.view(seg.dtype)
                n = values.numel()
                start = seg.dst_offset // target.element_size()
                target.reshape(-1)[start : start + n].copy_(values)
            total += seg.nbytes
        return total

    def _pread(self, file: int, view_u8: torch.Tensor, offset: int) -> None:
        fd, path = self._fds[file], self.files[file]
        buf = memoryview(view_u8.numpy())
        done = 0
        try:
            while done < len(buf):
                n = os.preadv(fd, [buf[done:]], offset + done)
                if n <= 0:
                    raise SlowTierError(
                        f"{path} ended after {offset + done} bytes while reading expert weights at bytes "
                        f"{offset}..{offset + len(buf)} (truncated during generation?)"
                    )
                done += n
        except OSError as e:
            raise SlowTierError(f"reading expert weights from {path} failed: {e}") from None
        self._check_unchanged(file)
        self._fadvise(fd, offset, len(buf))

    def _check_unchanged(self, file: int) -> None:
        """After a read: the path still names the file opened, unchanged; otherwise the bytes may be wrong."""
        path = self.files[file]
        if self.owned:  # an unlinked spill file: only this tier holds it
            return
        try:
            now_path = _signature(os.stat(path))
        except FileNotFoundError:
            raise SlowTierError(f"{path} disappeared during generation; expert weights can no longer be read from it") from None
        now_fd = _signature(os.fstat(self._fds[file]))
        if now_path != self._signatures[file] or now_fd != self._signatures[file]:
            raise SlowTierError(
                f"{path} changed during generation (size, modification time or inode differ from when it was opened); "
                f"its expert weights can no longer be trusted: restart with the new file"
            )

    def _fadvise(self, fd: int, offset: int, length: int) -> None:
        if self.drop_cache and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def _signature(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _find(entries: dict[str, _TensorEntry], name: str) -> tuple[str, _TensorEntry] | None:
    for full in (name, f"model.{name}"):
        if full in entries:
            return full, entries[full]
    return None


def has_tensor(checkpoint: str | Path, name: str) -> bool:
    """Whether the checkpoint's safetensors file(s) hold `name` (or model.`name`), from the headers alone."""
    for path in checkpoint_files(checkpoint):
        header, _ = read_safetensors_header(path)
        if name in header or f"model.{name}" in header:
            return True
    return False


def _expert_layout(entries, path: str, shape: LayerShape, files) -> list[list[_Segment]]:
    """Per expert, the file segments that make up its parts: w_in (gate rows, then up rows) and w_out, or the quantized parts."""
    E, H, D, F = shape.num_experts, shape.H, shape.D, shape.F
    if shape.spec is not None:
        return _quantized_layout(entries, path, shape, files)
    stacked = [
        (f"{path}.experts.w_in_EHD", f"{path}.experts.w_out_EDF"),  # moekit
        (f"{path}.experts.gate_up_proj", f"{path}.experts.down_proj"),  # transformers v5 fused experts
    ]
    for in_name, out_name in stacked:
        found_in, found_out = _find(entries, in_name), _find(entries, out_name)
        if found_in and found_out:
            (n_in, t_in), (n_out, t_out) = found_in, found_out
            _expect_shape(n_in, t_in, (E, H, D), files)
            _expect_shape(n_out, t_out, (E, D, F), files)
            per_in, per_out = t_in.nbytes // E, t_out.nbytes // E
            return [
                [_Segment(t_in.file, t_in.offset + e * per_in, per_in, t_in.dtype, 0, 0),
                 _Segment(t_out.file, t_out.offset + e * per_out, per_out, t_out.dtype, 1, 0)]
                for e in range(E)
            ]
    names = [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")]
    bases = [path, path.replace(".mlp", ".block_sparse_moe")]
    for base in bases:
        for gate, up, down in names:
            if _find(entries, f"{base}.experts.0.{down}.weight") is None:
                continue
            layout = []
            for e in range(E):
                segs = []
                parts = [(gate, 0, (F, D)), (up, 0, (F, D)), (down, 1, (D, F))] if H == 2 * F else [(up, 0, (F, D)), (down, 1, (D, F))]
                dst_offset = [0, 0]
                for part, dst, want in parts:
                    found = _find(entries, f"{base}.experts.{e}.{part}.weight")
                    if found is None:
                        raise OffloadError(f"{files[0].parent} lacks {base}.experts.{e}.{part}.weight for MoE layer {path}")
                    name, t = found
                    _expect_shape(name, t, want, files)
                    segs.append(_Segment(t.file, t.offset, t.nbytes, t.dtype, dst, dst_offset[dst]))
                    dst_offset[dst] += t.nbytes * _itemsize(shape.dtype) // _itemsize(t.dtype)
                layout.append(segs)
            return layout
    raise OffloadError(
        f"{files[0]} holds no expert weights for MoE layer {path!r} (looked for {path}.experts.w_in_EHD, "
        f"{path}.experts.gate_up_proj and per-expert gate/up/down or w1/w3/w2 weights): is it this model's checkpoint?"
    )


def _quantized_layout(entries, path: str, shape: LayerShape, files) -> list[list[_Segment]]:
    """Quantized experts are stored stacked ([E, ...] per part: `{path}.experts.w_in_EHD_q`, ..._scale, ...)."""
    E, found = shape.num_experts, []
    for i, (part, per_shape, dtype) in enumerate(shape.parts()):
        hit = _find(entries, f"{path}.experts.{part}")
        if hit is None:
            raise OffloadError(f"{files[0]} holds no {shape.spec.name} expert tensor {path}.experts.{part} for MoE layer "
                               f"{path!r}: is it this model's quantized checkpoint (written by `moekit quantize`)?")
        name, t = hit
        _expect_shape(name, t, (E, *per_shape), files)
        if t.dtype != dtype:
            raise OffloadError(f"{name} in {files[t.file]} is {t.dtype} but {shape.spec.name} stores it as {dtype}")
        found.append((i, t))
    return [[_Segment(t.file, t.offset + e * (t.nbytes // E), t.nbytes // E, t.dtype, i, 0) for i, t in found] for e in range(E)]


def _expect_shape(name: str, t: _TensorEntry, want: tuple[int, ...], files) -> None:
    if tuple(t.shape) != tuple(want):
        raise OffloadError(
            f"{name} in {files[t.file]} has shape {list(t.shape)} but the model expects {list(want)}: "
            f"the checkpoint does not match the model (or stores experts transposed, which the disk tier cannot read)"
        )
