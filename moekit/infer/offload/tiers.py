"""Slow tiers that hold the full expert weights: host memory, pinned host memory for CUDA, an emulated link.

Each tier reads one expert of one MoE layer into preallocated fast slots. The
disk tier (the checkpoint's own safetensors files) is in disk.py.
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
