"""Expert offloading: expert weights live in a slow tier and are computed from a fixed fast tier.

`offload_model(model, ...)` is a transform on a built model. Every MoE
layer's stacked experts are replaced by a small stack of fast *slots*
(`OffloadedExperts`); the full weights stay in a slow tier:

- `DiskTier` (CPU): the checkpoint's safetensors file(s). Each expert is read
  with positional reads straight into its preallocated slot, and the page
  cache for the bytes read is dropped (posix_fadvise DONTNEED), so that the
  next miss on that expert is a real read. Every read checks that the file
  is still the one opened (inode, size, mtime, ctime) and that the full
  length arrived; otherwise it raises `SlowTierError`.
- `EmulatedLinkTier`: any tier behind a link of configurable bandwidth and
  latency, for reproducible experiments (the offloader models the link's
  time in its transfer queue). Its label always says "emulated".
- `MemoryTier`: host RAM (the base of the emulated link; tests).
- `CudaHostTier` (CUDA): pinned host memory, copied to the device slots on a
  copy stream, ordered by events (see prefetch.CudaTransferQueue).

The fast tier's size is an `--expert-budget`: bytes ("2GB") or a fraction of
all experts ("25%"), split across layers in proportion to their expert
counts. Each layer's slots form an `ExpertCache` (expert_cache.py) with a
replacement policy; a `Predictor` (prefetch.py) names the next layer's
experts when a router fires, and those are fetched in the background while
this layer computes. A layer's computation waits for exactly the experts
it uses; the time spent waiting is the stall time.

Correctness: a slot is used only after its transfer finished without error;
any transfer error (even of a prefetch nobody waits for) is re-raised at
the next layer, so generation stops with a clear error instead of
computing with a half-read expert. Offloaded generation gives bit-identical
outputs to all-resident generation (same kernel on the same weights; the
tests check greedy tokens for every tier, policy and predictor).

Not here: the cache policies (expert_cache.py), predictors and transfer
queues (prefetch.py), the pre-gate heads (moekit.pregate), generation
loops (infer/engine.py).

Shape legend: E experts, S slots, H = 2F (SwiGLU) or F, D hidden, F expert
width, N assignments (tokens grouped by expert), T tokens.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import struct
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from ...errors import MoekitError
from ...moe.experts import Experts, choose_kernel
from ...moe.layers import MoELayer
from ..expert_cache import POLICIES, ExpertCache, RoutingTrace, build_policy
from ..prefetch import PREDICTORS, CudaTransferQueue, Predictor, ThreadTransferQueue, _sleep_until, build_predictor

TIERS = ("disk", "emulated", "memory", "cuda-host")


class OffloadError(MoekitError):
    """Offloading cannot be set up as asked (no MoE layers, a bad tier, ...)."""


class BudgetError(OffloadError, ValueError):
    """An expert budget that cannot be parsed or is too small."""


class SlowTierError(OffloadError):
    """A slow-tier read failed: the file changed, disappeared or was cut short."""


# ---------------------------------------------------------------- sizes


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer's expert weights: w_in [E, H, D] and w_out [E, D, F]."""

    num_experts: int
    H: int
    D: int
    F: int
    dtype: torch.dtype
    min_slots: int  # experts one token needs at once (top-k)

    @property
    def bytes_per_expert(self) -> int:
        return (self.H * self.D + self.D * self.F) * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    """'300MB', '1.5GiB', '4096' -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise BudgetError(f"{what} {text!r} is invalid: give bytes with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"{what} {text!r} is invalid: it must be > 0")
    return int(value)


def parse_bandwidth(text: str | float) -> float:
    """'2GB/s', '500MB/s', 2e9 -> bytes per second."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        value = parse_bytes(str(text).strip().removesuffix("/s").removesuffix("ps"), "link bandwidth")
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"link bandwidth {text!r} is invalid: it must be > 0, e.g. 2GB/s")
    return value


def parse_duration(text: str | float) -> float:
    """'50us', '2ms', '0' -> seconds."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|ms|us|ns|)\s*", str(text))
        if not m:
            raise BudgetError(f"link latency {text!r} is invalid: give a duration such as 50us, 2ms or 0")
        value = float(m.group(1)) * {"": 1, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}[m.group(2)]
    if not math.isfinite(value) or value < 0:
        raise BudgetError(f"link latency {text!r} is invalid: it must be >= 0")
    return value


def format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Budget:
    """A fast-tier size: a fraction of all experts, or bytes."""

    fraction: float | None = None
    bytes: int | None = None
    text: str = ""

    @classmethod
    def parse(cls, value: "str | float | int | Budget") -> "Budget":
        if isinstance(value, Budget):
            return value
        text = str(value).strip()
        if text.endswith("%"):
            try:
                pct = float(text[:-1])
            except ValueError:
                pct = float("nan")
            if not math.isfinite(pct) or not 0 < pct <= 100:
                raise BudgetError(f"expert budget {text!r} is invalid: a percentage must be in (0%, 100%]")
            return cls(fraction=pct / 100, text=text)
        if isinstance(value, float) and 0 < value <= 1:
            return cls(fraction=value, text=f"{value:.4g}")
        return cls(bytes=parse_bytes(text, "expert budget"), text=text)

    def slots(self, shapes: list[LayerShape]) -> list[int]:
        """Fast slots per MoE layer; BudgetError naming the minimum when a layer cannot hold its top-k."""
        total = sum(s.num_experts * s.bytes_per_expert for s in shapes)
        fraction = self.fraction if self.fraction is not None else self.bytes / total
        slots = [min(s.num_experts, int(math.floor(fraction * s.num_experts + 1e-9))) for s in shapes]
        for layer, (n, s) in enumerate(zip(slots, shapes)):
            if n < s.min_slots:
                min_fraction = max(sh.min_slots / sh.num_experts for sh in shapes)
                min_bytes = math.ceil(min_fraction * total)
                raise BudgetError(
                    f"expert budget {self.text or fraction} is too small: it holds {n} expert(s) of MoE layer {layer}, "
                    f"which routes each token to {s.min_slots}; the minimum is {100 * min_fraction:.4g}% of experts "
                    f"({min_bytes} bytes, {format_bytes(min_bytes)})"
                )
        return slots


# ---------------------------------------------------------------- slow tiers


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """One memcpy without the GIL and without torch's thread pool (it runs beside the compute threads)."""
    if dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype and dst.is_contiguous() and src.is_contiguous():
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
    else:
        dst.copy_(src)


class SlowTier:
    """Where the full expert weights live. `read` fills one fast slot and returns the bytes moved."""

    kind = "base"
    emulated = False
    label = "slow tier"

    def read(self, layer: int, expert: int, dst_in_HD: torch.Tensor, dst_out_DF: torch.Tensor) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class MemoryTier(SlowTier):
    """Experts held in host memory (the tensors given; nothing is copied up front)."""

    kind = "memory"
    label = "host memory"

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor]]):
        self.weights = [(w_in.detach(), w_out.detach()) for w_in, w_out in weights]

    def read(self, layer, expert, dst_in_HD, dst_out_DF):
        w_in, w_out = self.weights[layer]
        _copy_bytes(dst_in_HD, w_in[expert])
        _copy_bytes(dst_out_DF, w_out[expert])
        return dst_in_HD.numel() * dst_in_HD.element_size() + dst_out_DF.numel() * dst_out_DF.element_size()


class CudaHostTier(MemoryTier):
    """Experts in pinned host memory, copied to device slots with non-blocking copies (on the copy stream)."""

    kind = "cuda-host"
    label = "pinned host memory -> CUDA (copy stream)"

    def __init__(self, weights: list[tuple[torch.Tensor, torch.Tensor]]):
        self.weights = [(w_in.detach().cpu().pin_memory(), w_out.detach().cpu().pin_memory()) for w_in, w_out in weights]

    def read(self, layer, expert, dst_in_HD, dst_out_DF):
        w_in, w_out = self.weights[layer]
        dst_in_HD.copy_(w_in[expert], non_blocking=True)
        dst_out_DF.copy_(w_out[expert], non_blocking=True)
        return dst_in_HD.numel() * dst_in_HD.element_size() + dst_out_DF.numel() * dst_out_DF.element_size()


class EmulatedLinkTier(SlowTier):
    """Another tier behind an emulated link: each transfer takes latency + bytes / bandwidth (at least).

    Transfers are serial (one queue), like one PCIe or disk channel. The
    wait is a sleep, so compute on the other threads goes on meanwhile.
    """

    kind = "emulated"
    emulated = True

    def __init__(self, inner: SlowTier, bandwidth: float | str, latency: float | str = 0.0):
        self.inner = inner
        self.bandwidth = parse_bandwidth(bandwidth)
        self.latency = parse_duration(latency)
        self.label = (
            f"emulated link ({format_bytes(self.bandwidth)}/s, {self.latency * 1e6:.0f} us latency; "
            f"emulated, not a measured device) over {inner.label}"
        )

    def cost(self, nbytes: int) -> float:
        """Seconds one transfer of `nbytes` occupies the link."""
        return self.latency + nbytes / self.bandwidth

    def read(self, layer, expert, dst_in_HD, dst_out_DF):
        """Copy, then sleep out the link time (used alone; the offloader models the link in its queue)."""
        start = time.perf_counter()
        nbytes = self.inner.read(layer, expert, dst_in_HD, dst_out_DF)
        _sleep_until(start + self.cost(nbytes))
        return nbytes

    def close(self) -> None:
        self.inner.close()


# ---------------------------------------------------------------- the disk tier

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class _TensorEntry:
    file: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class _Segment:
    """Bytes of one expert in a file -> bytes of its slot (`dst` = 'in' or 'out', at a byte offset)."""

    file: int
    offset: int
    nbytes: int
    dtype: torch.dtype
    dst: str
    dst_offset: int


def read_safetensors_header(path: Path) -> tuple[dict[str, tuple[str, list[int], int, int]], int]:
    """({name: (dtype, shape, begin, end)}, data start) without reading any tensor data."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than 8 bytes")
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000:
                raise ValueError(f"header length {length} is implausible")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise SlowTierError(f"{path} is not a readable safetensors file: {e}") from None
    entries = {
        name: (v["dtype"], list(v["shape"]), int(v["data_offsets"][0]), int(v["data_offsets"][1]))
        for name, v in header.items() if name != "__metadata__"
    }
    return entries, 8 + length


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

    def __init__(self, checkpoint: str | Path, module_paths: list[str], shapes: list[LayerShape], drop_cache: bool = True):
        self.files = checkpoint_files(checkpoint)
        self.drop_cache = drop_cache
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

    def read(self, layer, expert, dst_in_HD, dst_out_DF):
        total = 0
        dst = {"in": dst_in_HD, "out": dst_out_DF}
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


def _expert_layout(entries, path: str, shape: LayerShape, files) -> list[list[_Segment]]:
    """Per expert, the file segments that make up its w_in (gate rows, then up rows) and w_out."""
    E, H, D, F = shape.num_experts, shape.H, shape.D, shape.F
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
                [_Segment(t_in.file, t_in.offset + e * per_in, per_in, t_in.dtype, "in", 0),
                 _Segment(t_out.file, t_out.offset + e * per_out, per_out, t_out.dtype, "out", 0)]
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
                parts = [(gate, "in", (F, D)), (up, "in", (F, D)), (down, "out", (D, F))] if H == 2 * F else [(up, "in", (F, D)), (down, "out", (D, F))]
                dst_offset = {"in": 0, "out": 0}
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


def _expect_shape(name: str, t: _TensorEntry, want: tuple[int, ...], files) -> None:
    if tuple(t.shape) != tuple(want):
        raise OffloadError(
            f"{name} in {files[t.file]} has shape {list(t.shape)} but the model expects {list(want)}: "
            f"the checkpoint does not match the model (or stores experts transposed, which the disk tier cannot read)"
        )


# ---------------------------------------------------------------- statistics


@dataclass
class LayerStats:
    steps: int = 0
    accesses: int = 0  # experts demanded, summed over steps
    hits: int = 0  # demanded and already in a slot (or on its way there) when the gate fired
    misses: int = 0  # demanded and fetched only after the gate fired
    prefetches: int = 0  # transfers started by the predictor
    prefetch_used: int = 0  # ... whose expert the step then used
    predicted: int = 0  # experts the predictor asked to have in the fast tier
    predicted_correct: int = 0  # ... that the step used
    demanded_predicted: int = 0  # experts demanded in steps that had a prediction
    prefetches_cancelled: int = 0  # wrong prefetches dropped before they started (not counted as transfers)
    transfers: int = 0
    bytes_moved: int = 0
    stall_s: float = 0.0  # time the computation waited for experts

    def add(self, other: "LayerStats") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


def summarize(layers: list[LayerStats]) -> dict:
    total = LayerStats()
    for s in layers:
        total.add(s)
    out = asdict(total)
    out["miss_rate"] = total.misses / total.accesses if total.accesses else 0.0
    out["hit_rate"] = total.hits / total.accesses if total.accesses else 0.0
    out["prefetch_precision"] = total.predicted_correct / total.predicted if total.predicted else None
    out["prefetch_recall"] = total.predicted_correct / total.demanded_predicted if total.demanded_predicted else None
    out["prefetch_useful_fraction"] = total.prefetch_used / total.prefetches if total.prefetches else None
    return out


# ---------------------------------------------------------------- the offloaded experts


class OffloadedExperts(nn.Module):
    """Stands in for a layer's `Experts`: S fast slots, filled on demand by the offloader.

    `forward` is the `Experts` call every MoE layer makes (training, prefill and
    decode alike): the router's hook has already started fetching the chosen
    experts; forward waits for them and computes on their slots with the kernel
    the resident layer would pick, so the arithmetic (and the tokens) is unchanged.
    """

    def __init__(self, offloader: "Offloader", layer: int, full_shape: LayerShape, activation: str, kernel: str):
        super().__init__()
        self.slots: Experts | None = None
        self.layer = layer
        self.kernel = kernel
        self.activation = activation
        self._offloader = offloader
        self._shape = full_shape
        # A weightless stand-in of the resident experts: kernel choices are made exactly as they would be.
        with torch.device("meta"):
            self._resident = Experts(full_shape.num_experts, full_shape.D, full_shape.F, activation=activation, kernel=kernel)

    @property
    def num_experts(self) -> int:
        return self._shape.num_experts

    def kernel_for(self, x: torch.Tensor, counts_E: torch.Tensor | None = None, kernel: str | None = None) -> str:
        """The kernel the resident layer would run for this input (so results are bit-identical)."""
        if hasattr(self._resident, "kernel_for"):
            return self._resident.kernel_for(x, counts_E, kernel)
        name = kernel or self.kernel
        return choose_kernel(x, self._resident.w_in_EHD, self._resident.w_out_EDF) if name == "auto" else name

    def forward(self, x_ND: torch.Tensor, rows_E: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        """Like Experts.forward: x_ND holds rows_E[e] consecutive rows per expert (compact or padded)."""
        name = kernel if kernel not in (None, "auto") else self.kernel_for(x_ND, rows_E, kernel)
        return self._offloader._compute(self.layer, x_ND, rows_E, name)


# ---------------------------------------------------------------- the offloader


class Offloader:
    """Owns the fast slots, caches, transfers, predictor and statistics of an offloaded model.

    Built once per model and slow tier (`offload_model`); `configure` sets (or
    changes) the budget, policy and predictor, starting from empty slots.
    """

    def __init__(self, model: nn.Module, moe_layers: list[tuple[str, MoELayer]], tier: SlowTier, shapes: list[LayerShape]):
        self.model = model
        self.paths = [name for name, _ in moe_layers]
        self.layers = [m for _, m in moe_layers]
        self.tier = tier
        self.shapes = shapes
        self.device = self.layers[0].experts.w_in_EHD.device
        self.queue = CudaTransferQueue(self.device) if self.device.type == "cuda" else ThreadTransferQueue()
        self._hooks = []
        self._inputs: list[torch.Tensor | None] = [None for _ in shapes]
        self._demand: list[list[int] | None] = [None for _ in shapes]
        self._open = [False for _ in shapes]
        self._slots: list[Experts] = []
        self.caches: list[ExpertCache] = []
        self.experts: list[OffloadedExperts] = []
        for j, (layer, shape) in enumerate(zip(self.layers, shapes)):
            old = layer.experts
            layer.experts = OffloadedExperts(self, j, shape, old.activation, old.kernel)
            self.experts.append(layer.experts)
            self._hooks.append(layer.register_forward_pre_hook(partial(self._on_layer_input, j)))
            self._hooks.append(layer.router.register_forward_hook(partial(self._on_route, j)))
        self.configured = False

    def configure(self, budget: str | float | Budget, policy: str = "lru", predictor: str | Predictor = "none", *,
                  trace: RoutingTrace | None = None, pregate: str | Path | None = None, lfru_half_life: float = 8.0) -> "Offloader":
        """(Re)start with empty fast slots for `budget`, cache `policy` and `predictor`; statistics reset."""
        if policy not in POLICIES:
            raise OffloadError(f"unknown cache policy {policy!r}: accepted policies are {', '.join(POLICIES)}")
        if isinstance(predictor, str) and predictor not in PREDICTORS:
            raise OffloadError(f"unknown predictor {predictor!r}: accepted predictors are {', '.join(PREDICTORS)}")
        if policy == "belady" and trace is None:
            raise OffloadError("the belady cache policy needs a routing trace of the same generation (record one first)")
        budget = Budget.parse(budget)
        num_slots = budget.slots(self.shapes)
        pred = predictor if isinstance(predictor, Predictor) else build_predictor(predictor, pregate, self.model)
        self.queue.drain()
        self.queue.check()
        options = {"half_life": lfru_half_life} if policy == "lfru" else {}
        self.caches = [
            ExpertCache(s.num_experts, n, build_policy(policy, j, trace, **options), j)
            for j, (s, n) in enumerate(zip(self.shapes, num_slots))
        ]
        self._slots = []
        for j, (shape, n) in enumerate(zip(self.shapes, num_slots)):
            slots = _make_slots(n, shape, self.experts[j].activation, self.device)
            self.experts[j].slots = slots
            self._slots.append(slots)
        self.budget, self.num_slots, self.policy_name, self.predictor = budget, num_slots, policy, pred
        self.transfers: list[dict] = [{} for _ in self.shapes]
        self.prefetched: list[set[int]] = [set() for _ in self.shapes]
        self.predicted: list[list[int] | None] = [None for _ in self.shapes]
        self.usage = [[0] * s.num_experts for s in self.shapes]
        self.trace = RoutingTrace()
        self.layer_stats = [LayerStats() for _ in self.shapes]
        self._open = [False for _ in self.shapes]
        self._demand = [None for _ in self.shapes]
        self.predictor.bind(self.layers, self.usage)
        self.configured = True
        return self

    # ------------------------------------------------------------ one step of a layer

    def _on_layer_input(self, j: int, module, args) -> None:
        # The MoE layer's own input (a pre-gated model feeds its router the previous layer's instead).
        self._inputs[j] = args[0] if args else None

    def _on_route(self, j: int, module, args, routing) -> None:
        """Layer j's gate fired (MoELayer.forward): fetch its missing experts, start prefetching layer j+1's."""
        x = self._inputs[j]
        self._inputs[j] = None
        idx_N = routing.expert_idx_N
        demand = sorted(set(idx_N.tolist())) if idx_N.numel() <= 64 else idx_N.unique().tolist()
        self._begin_step(j, demand)
        self._demand[j] = demand
        if x is not None:
            self._predict_next(j, x)

    def _predict_next(self, j: int, x: torch.Tensor) -> None:
        """x: layer j's MoE input, [B, T, D] (or [T, D] for single-position steps)."""
        x = x.detach()
        if j + 1 < len(self.layers):
            self._prefetch(j + 1, self.predictor.predict(j, x.reshape(-1, x.shape[-1])))
        elif self.predictor.wraps:  # the first layer of the next token, from each sequence's last position
            self._prefetch(0, self.predictor.predict(j, x[:, -1] if x.dim() == 3 else x))

    def _begin_step(self, j: int, demand: list[int]) -> None:
        if not self.configured:
            raise OffloadError("the offloaded model has no fast tier yet: call configure(budget, ...)")
        if self._open[j]:  # a step left open (its computation failed): close it first
            self._end_step(j)
        self.queue.check()
        cache, st = self.caches[j], self.layer_stats[j]
        cache.begin_step(demand)
        self._open[j] = True
        self.trace.record(j, demand)
        usage = self.usage[j]
        for e in demand:
            usage[e] += 1
        st.steps += 1
        st.accesses += len(demand)
        predicted = self.predicted[j]
        if predicted is not None:
            st.predicted += len(predicted)
            st.predicted_correct += len(set(predicted).intersection(demand))
            st.demanded_predicted += len(demand)
        st.prefetch_used += len(self.prefetched[j].intersection(demand))
        self._settle_prefetches(j, demand)
        missing = [e for e in demand if e not in cache]
        st.hits += len(demand) - len(missing)
        st.misses += len(missing)
        if len(demand) <= cache.num_slots:
            keep = set(demand)
            for e in missing:
                self._fetch(j, e, keep, demand=True)
        # More experts than slots (a large batch): _compute fetches them in waves.

    def _settle_prefetches(self, j: int, demand: list[int]) -> None:
        """The gate fired: prefetches it needs jump the queue; wrong ones not yet started are cancelled."""
        transfers, needed = self.transfers[j], set(demand)
        for e in needed:
            t = transfers.get(e)
            if t is not None and not t.done():
                self.queue.promote(t)
        for e in [e for e in self.prefetched[j] if e not in needed]:
            t = transfers.get(e)
            if t is not None and self.queue.cancel(t):
                transfers.pop(e)
                self.caches[j].drop(e)
                self.prefetched[j].discard(e)
                st = self.layer_stats[j]
                st.transfers -= 1
                st.bytes_moved -= self.shapes[j].bytes_per_expert
                st.prefetches_cancelled += 1

    def _fetch(self, j: int, expert: int, keep: set[int], demand: bool) -> bool:
        cache, st = self.caches[j], self.layer_stats[j]
        placed = cache.place(expert, keep, demand=demand)
        if placed is None:
            if demand:
                raise RuntimeError(f"no slot can be freed for expert {expert} of MoE layer {j}")
            return False
        slot, evicted = placed
        if evicted is not None:
            old = self.transfers[j].pop(evicted, None)
            if old is not None:
                self.queue.retire(old)  # a queued write into this slot must not land after the new one
            self.prefetched[j].discard(evicted)
        slots = self._slots[j]
        dst = (slots.w_in_EHD.data[slot], slots.w_out_EDF.data[slot])
        if isinstance(self.tier, EmulatedLinkTier) and isinstance(self.queue, ThreadTransferQueue):
            # The queue models the link's time; the copy itself runs as soon as the transfer starts.
            read = partial(self.tier.inner.read, j, expert, *dst)
            cost = self.tier.cost(self.shapes[j].bytes_per_expert)
            self.transfers[j][expert] = self.queue.submit(j, read, urgent=demand, cost=cost)
        else:
            read = partial(self.tier.read, j, expert, *dst)
            self.transfers[j][expert] = self.queue.submit(j, read, urgent=demand)
        st.transfers += 1
        st.bytes_moved += self.shapes[j].bytes_per_expert
        return True

    def _prefetch(self, j: int, ranked: list[int] | None) -> None:
        cache = self.caches[j]
        if ranked is None:
            self.predicted[j] = None
            return
        top = list(ranked[: cache.num_slots])
        self.predicted[j] = top
        keep = set(top)
        for e in top:
            if e not in cache:
                if not self._fetch(j, e, keep, demand=False):
                    break
                self.prefetched[j].add(e)
                self.layer_stats[j].prefetches += 1
            cache.protect([e])

    def _wait(self, j: int, experts: list[int]) -> None:
        st, transfers = self.layer_stats[j], self.transfers[j]
        for e in experts:
            st.stall_s += transfers[e].wait()
        self.queue.check()

    def _end_step(self, j: int) -> None:
        if not self._open[j]:
            return
        self._open[j] = False
        self._demand[j] = None
        self.queue.layer_done(j)
        self.caches[j].end_step()
        self.prefetched[j].clear()
        self.predicted[j] = None

    def _compute(self, j: int, x_ND: torch.Tensor, rows_E: torch.Tensor, kernel: str) -> torch.Tensor:
        cache, slots = self.caches[j], self._slots[j]
        rows = rows_E.tolist()
        if not self._open[j]:  # called without the router hook: the rows say who is needed
            self._begin_step(j, [e for e, r in enumerate(rows) if r])
        demand = self._demand[j]
        # Padded layouts give every expert rows; only the experts the router chose need their weights.
        needed = [e for e in (demand if demand is not None else range(len(rows))) if rows[e]]
        starts = [0] * len(rows)
        for e in range(1, len(rows)):
            starts[e] = starts[e - 1] + rows[e - 1]
        waves = self._waves(cache, needed)
        pad_to = max((rows[e] for e in needed), default=0) if kernel == "bmm" else 0
        out = None
        try:
            for wave in waves:
                if len(waves) > 1:
                    cache.pinned = set(wave)
                for e in wave:
                    if e not in cache:
                        self._fetch(j, e, set(wave), demand=True)
                self._wait(j, wave)
                out = self._compute_wave(j, slots, x_ND, rows, starts, wave, kernel, out, pad_to)
                self.queue.layer_done(j)
        except BaseException:
            self._forget_failed(j)
            raise
        finally:
            self._end_step(j)
        return out if out is not None else x_ND.new_zeros(x_ND.shape[0], self.shapes[j].D)

    def _waves(self, cache: ExpertCache, active: list[int]) -> list[list[int]]:
        if len(active) <= cache.num_slots:
            return [active]
        # Experts already in the fast tier go first, so none of them is evicted before it is used.
        order = [e for e in active if e in cache] + [e for e in active if e not in cache]
        return [sorted(order[i : i + cache.num_slots]) for i in range(0, len(order), cache.num_slots)]

    def _compute_wave(self, j, slots: Experts, x_ND, counts, starts, wave, kernel, out, pad_to):
        """The wave's experts on their slots: tokens reordered from expert order to slot order and back.

        pad_to (bmm): every expert gets that many rows, the step's largest count, as in the resident
        layer's padded batch, so each expert's matmul has the same shape and gives the same bits.
        """
        cache = self.caches[j]
        counts_S = [0] * cache.num_slots
        by_slot = sorted(wave, key=lambda e: cache.slot_of[e])
        for e in wave:
            counts_S[cache.slot_of[e]] = pad_to or counts[e]
        counts_S = torch.tensor(counts_S, device=x_ND.device)
        rows = torch.cat([torch.arange(starts[e], starts[e] + counts[e]) for e in by_slot]).to(x_ND.device)
        if pad_to:
            at = torch.cat([torch.arange(i * pad_to, i * pad_to + counts[e]) for i, e in enumerate(by_slot)]).to(x_ND.device)
            x_in = x_ND.new_zeros(len(by_slot) * pad_to, x_ND.shape[1]).index_copy_(0, at, x_ND[rows])
            y = slots(x_in, counts_S, kernel=kernel)[at]
        elif out is None and by_slot == wave and rows.numel() == x_ND.shape[0]:
            return slots(x_ND, counts_S, kernel=kernel)  # slot order == expert order: nothing to reorder
        else:
            y = slots(x_ND[rows], counts_S, kernel=kernel)
        if out is None:
            out = y.new_zeros(x_ND.shape[0], y.shape[1])
        out[rows] = y
        return out

    def _forget_failed(self, j: int) -> None:
        """After an error, forget every expert whose transfer did not finish cleanly (its slot may be torn)."""
        for e, t in list(self.transfers[j].items()):
            try:
                ok = t.done() and t.wait() == 0.0
            except BaseException:
                ok = False
            if not ok:
                self.caches[j].drop(e)
                self.transfers[j].pop(e, None)

    # ------------------------------------------------------------ public

    def stats(self) -> dict:
        """Counters since the last reset: hits, misses, prefetch precision/recall, bytes moved, stall time."""
        if isinstance(self.queue, CudaTransferQueue):
            self.layer_stats[-1].stall_s += self.queue.stall_seconds()
        summary = summarize(self.layer_stats)
        summary.update(
            tier=self.tier.label,
            tier_kind=self.tier.kind,
            emulated=self.tier.emulated,
            budget=self.budget.text,
            slots_per_layer=list(self.num_slots),
            experts_per_layer=[s.num_experts for s in self.shapes],
            fast_bytes=sum(n * s.bytes_per_expert for n, s in zip(self.num_slots, self.shapes)),
            total_expert_bytes=sum(s.num_experts * s.bytes_per_expert for s in self.shapes),
            policy=self.policy_name,
            predictor=self.predictor.name,
            layers=[asdict(s) for s in self.layer_stats],
        )
        return summary

    def reset_stats(self) -> None:
        self.layer_stats = [LayerStats() for _ in self.shapes]

    def drain(self) -> None:
        """Wait for every transfer in flight (e.g. before timing a new phase)."""
        self.queue.drain()
        self.queue.check()

    def close(self) -> None:
        """Stop the transfer thread and close the slow tier (the model can no longer run)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.queue.close()
        self.tier.close()
        self.configured = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _make_slots(n: int, shape: LayerShape, activation: str, device) -> Experts:
    with torch.device("meta"):
        slots = Experts(n, shape.D, shape.F, activation=activation, kernel="loop")
    slots = slots.to_empty(device=device).to(shape.dtype)
    for p in slots.parameters():
        p.requires_grad_(False)
        p.data.zero_()
    return slots


def format_stats(stats: dict, timing: dict | None = None) -> str:
    """The `moekit generate --stats` report."""
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [
        f"expert offloading: {stats['tier']}",
        f"  fast tier: budget {stats['budget']} = {format_bytes(stats['fast_bytes'])} of {format_bytes(stats['total_expert_bytes'])} "
        f"of experts; slots per MoE layer {stats['slots_per_layer']} (of {stats['experts_per_layer']})",
        f"  cache {stats['policy']}, prefetch {stats['predictor']}",
        f"  expert accesses {stats['accesses']}: hits {stats['hits']}, misses {stats['misses']} (miss rate {pct(stats['miss_rate'])})",
        f"  prefetch: {stats['prefetches']} transfers, {stats['prefetch_used']} used; "
        f"precision {pct(stats['prefetch_precision'])}, recall {pct(stats['prefetch_recall'])}",
        f"  moved {format_bytes(stats['bytes_moved'])} in {stats['transfers']} transfers; "
        f"stalled {1000 * stats['stall_s']:.1f} ms waiting for experts",
    ]
    if timing:
        lines.append(
            f"  {timing['new_tokens']} new tokens; prefill {1000 * timing['prefill_s']:.1f} ms, "
            f"decode {timing['decode_tokens_per_s']:.2f} tokens/s"
        )
    if stats["emulated"]:
        lines.append("  (the slow tier is an EMULATED link: its timings are a model, not a measurement of real hardware)")
    return "\n".join(lines)


# ---------------------------------------------------------------- the transform


def find_moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def layer_shapes(moe_layers: list[tuple[str, MoELayer]]) -> list[LayerShape]:
    shapes = []
    for _, m in moe_layers:
        w_in, w_out = m.experts.w_in_EHD, m.experts.w_out_EDF
        E, H, D = w_in.shape
        k = 1 if m.cfg.router == "expert_choice" else m.cfg.top_k
        shapes.append(LayerShape(E, H, D, w_out.shape[2], w_in.dtype, k))
    return shapes


def offload_model(
    model: nn.Module,
    budget: str | float | Budget,
    *,
    tier: str | SlowTier = "disk",
    checkpoint: str | Path | None = None,
    policy: str = "lru",
    predictor: str | Predictor = "none",
    pregate: str | Path | None = None,
    trace: RoutingTrace | None = None,
    link_bandwidth: str | float | None = None,
    link_latency: str | float = 0.0,
    lfru_half_life: float = 8.0,
    verify: bool = True,
) -> Offloader:
    """Offload the experts of every MoE layer of `model`; returns the `Offloader` (stats, configure, close).

    tier: "disk" (reads `checkpoint`'s safetensors), "emulated" (host memory
    behind a link of `link_bandwidth` and `link_latency`), "memory",
    "cuda-host" (pinned host -> CUDA), or a SlowTier. The model's own expert
    weights are dropped from it (they live in the slow tier from now on).
    Everything is checked before the model is changed.
    """
    moe_layers = find_moe_layers(model)
    if not moe_layers:
        raise OffloadError("the model has no MoE layers, so there are no experts to offload")
    if policy not in POLICIES:
        raise OffloadError(f"unknown cache policy {policy!r}: accepted policies are {', '.join(POLICIES)}")
    if isinstance(predictor, str) and predictor not in PREDICTORS:
        raise OffloadError(f"unknown predictor {predictor!r}: accepted predictors are {', '.join(PREDICTORS)}")
    if any(not isinstance(m.experts, Experts) for _, m in moe_layers):
        raise OffloadError("the model's experts are already offloaded (or not stacked moekit Experts)")
    if policy == "belady" and trace is None:
        raise OffloadError("the belady cache policy needs a routing trace of the same generation (record one first)")
    shapes = layer_shapes(moe_layers)
    Budget.parse(budget).slots(shapes)  # a budget that is too small fails before anything is changed
    pred = predictor if isinstance(predictor, Predictor) else build_predictor(predictor, pregate, model)
    device = moe_layers[0][1].experts.w_in_EHD.device
    slow = _build_tier(tier, moe_layers, shapes, checkpoint, link_bandwidth, link_latency, device)
    if verify and isinstance(slow, DiskTier):
        _verify_tier(slow, moe_layers, shapes)
    offloader = Offloader(model, moe_layers, slow, shapes)
    return offloader.configure(budget, policy, pred, trace=trace, lfru_half_life=lfru_half_life)


def _build_tier(tier, moe_layers, shapes, checkpoint, link_bandwidth, link_latency, device) -> SlowTier:
    if isinstance(tier, SlowTier):
        return tier
    if tier not in TIERS:
        raise OffloadError(f"unknown slow tier {tier!r}: accepted tiers are {', '.join(TIERS)}")
    weights = [(m.experts.w_in_EHD.detach(), m.experts.w_out_EDF.detach()) for _, m in moe_layers]
    if device.type == "cuda":
        if tier != "cuda-host":
            raise OffloadError(f"on CUDA the slow tier is pinned host memory (tier 'cuda-host'), not {tier!r}")
        return CudaHostTier(weights)
    if tier == "cuda-host":
        raise OffloadError("tier 'cuda-host' needs a model on a CUDA device; on CPU use 'disk' or 'emulated'")
    if tier == "disk":
        if checkpoint is None:
            raise OffloadError("the disk tier needs the checkpoint the model was loaded from")
        return DiskTier(checkpoint, [p for p, _ in moe_layers], shapes)
    if tier == "memory":
        return MemoryTier(weights)
    if link_bandwidth is None:
        raise OffloadError("the emulated tier needs a link bandwidth (e.g. 2GB/s)")
    return EmulatedLinkTier(MemoryTier(weights), link_bandwidth, link_latency)


def _verify_tier(tier: DiskTier, moe_layers, shapes) -> None:
    """The checkpoint's first expert of each layer must equal the model's: a wrong file must not give wrong tokens."""
    for j, ((path, m), shape) in enumerate(zip(moe_layers, shapes)):
        w_in = torch.empty(shape.H, shape.D, dtype=shape.dtype)
        w_out = torch.empty(shape.D, shape.F, dtype=shape.dtype)
        tier.read(j, 0, w_in, w_out)
        if not (torch.equal(w_in, m.experts.w_in_EHD[0].detach().cpu()) and torch.equal(w_out, m.experts.w_out_EDF[0].detach().cpu())):
            tier.close()
            raise OffloadError(
                f"the expert weights of {path} in {tier.files[0]} differ from the model's: offload from the checkpoint "
                f"the model was loaded from"
            )
