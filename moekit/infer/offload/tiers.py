"""Slow tiers that hold the full expert weights: host memory, pinned host memory for CUDA, an emulated link.

Each tier reads one expert of one MoE layer into preallocated fast slots:
`read(layer, expert, *dst)` fills one destination tensor per stored part of
the expert, in LayerShape.parts() order (full precision: w_in, w_out;
quantized: codes, scales [and zero points] of w_in, then of w_out), and
returns the bytes moved; `read_bytes(layer, expert)` says beforehand what a tier whose stored form
differs from the slots' reads (a GGUF file's packed blocks), None for the slot's size. The disk tier (the checkpoint's own safetensors
files) is in disk.py; tiers made by converting another (quantizing on read,
a spill file) in requant.py.
"""

from __future__ import annotations

import ctypes
import time

import torch

from ..prefetch import _sleep_until
from .budget import format_bytes, parse_bandwidth, parse_duration


# ---------------------------------------------------------------- slow tiers


def _copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """One memcpy without the GIL and without torch's thread pool (it runs beside the compute threads)."""
    if dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype and dst.is_contiguous() and src.is_contiguous():
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
    else:
        dst.copy_(src)


class SlowTier:
    """Where the expert weights live. `read` fills one fast slot (one tensor per part) and returns the bytes moved."""

    kind = "base"
    emulated = False
    label = "slow tier"

    def read(self, layer: int, expert: int, *dst: torch.Tensor) -> int:
        raise NotImplementedError

    def read_bytes(self, layer: int, expert: int) -> int | None:
        """Bytes one read of this expert takes from the tier, counted when it is queued; None: the slot's size."""
        return None

    def close(self) -> None:
        pass


class MemoryTier(SlowTier):
    """Experts held in host memory (the stacked [E, ...] tensors given, one per part; nothing is copied up front)."""

    kind = "memory"
    label = "host memory"

    def __init__(self, weights: list[tuple[torch.Tensor, ...]]):
        self.weights = [tuple(w.detach() for w in parts) for parts in weights]

    def read(self, layer, expert, *dst):
        for target, stacked in zip(dst, self.weights[layer], strict=True):
            _copy_bytes(target, stacked[expert])
        return sum(t.numel() * t.element_size() for t in dst)


class CudaHostTier(MemoryTier):
    """Experts in pinned host memory, copied to device slots with non-blocking copies (on the copy stream)."""

    kind = "cuda-host"
    label = "pinned host memory -> CUDA (copy stream)"

    def __init__(self, weights: list[tuple[torch.Tensor, ...]]):
        self.weights = [tuple(w.detach().cpu().pin_memory() for w in parts) for parts in weights]

    def read(self, layer, expert, *dst):
        for target, stacked in zip(dst, self.weights[layer], strict=True):
            target.copy_(stacked[expert], non_blocking=True)
        return sum(t.numel() * t.element_size() for t in dst)


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

    def read(self, layer, expert, *dst):
        """Copy, then sleep out the link time (used alone; the offloader models the link in its queue)."""
        start = time.perf_counter()
        nbytes = self.inner.read(layer, expert, *dst)
        _sleep_until(start + self.cost(nbytes))
        return nbytes

    def read_bytes(self, layer, expert):
        return self.inner.read_bytes(layer, expert)

    def close(self) -> None:
        self.inner.close()
