"""Compiled matmuls on quantized weights for a few rows per matrix (decoding): numba, or nothing.

`quantized_matmul(x_ND, q, scale, zero, spec, groups)` computes, for every
(expert, first row, row count) in `groups`, y[rows] = x[rows] @ W_e^T with W_e
the expert's weight in quant_format's layout, reading the integer codes
directly (no fp32 copy of the weight). Rows are the outer parallel loop's
partners: one thread owns an output channel and runs every row of its expert
against that channel's codes while they sit in cache, so a weight byte is
read once per call however many rows share it.

- int8: y = scale[o] * sum_i q[o, i] x[i].
- int4: per group g, y += scale[o, g] * (sum_j code[o, j] x[j] - zero[o, g] * sum_j x[j]);
  x is split once per call into its even and odd columns (the low and high
  nibbles, read through a 256-entry table), and the group sums of x are
  computed once per row.

Why numba: on the 2-core CPU this was written on, PyTorch's eager int8/int4
pack-mm ops were 6-15x slower than fp32 F.linear at batch 1 while a numba
`prange` GEMV was about 2x faster (benchmarks/results/quant_kernels.md).
`AVAILABLE` is False where numba is not installed; callers then use the
dequantize reference (quantized.py). Accumulation is fp32 in a different
order from a BLAS matmul: results agree with the reference to fp32 rounding.

Not here: the format (quant_format.py), kernel choice (quantized.py).
"""

from __future__ import annotations

import numpy as np
import torch

from .quant_format import SYMMETRIC_ZERO, QuantSpec

try:  # numba is an install dependency, but the package must still import (and fall back) without it
    import numba
    from numba import njit, prange

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None
    AVAILABLE = False


if AVAILABLE:

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _int8_kernel(x, q, scale, experts, starts, counts, out):  # pragma: no cover - compiled
        A, O, I = experts.shape[0], q.shape[1], q.shape[2]
        for t in prange(A * O):
            a, o = t // O, t % O
            e = experts[a]
            s = scale[e, o, 0]
            for r in range(starts[a], starts[a] + counts[a]):
                acc = numba.float32(0.0)
                for i in range(I):
                    acc += numba.float32(q[e, o, i]) * x[r, i]
                out[r, o] = acc * s

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _int4_kernel(xe, xo, xsum, q, scale, zero, sym, group, experts, starts, counts, out):  # pragma: no cover
        A, O, G = experts.shape[0], q.shape[1], scale.shape[2]
        half = group // 2
        lo, hi = np.empty(256, np.float32), np.empty(256, np.float32)  # nibble values of every byte
        for b in range(256):
            lo[b], hi[b] = b & 15, b >> 4
        for t in prange(A * O):
            a, o = t // O, t % O
            e = experts[a]
            q_o = q[e, o]  # 1-D views: plain indexing inside the hot loop
            for r in range(starts[a], starts[a] + counts[a]):
                xe_r, xo_r = xe[r], xo[r]
                total = numba.float32(0.0)
                for g in range(G):
                    acc = numba.float32(0.0)
                    base = g * half
                    for j in range(half):  # range(0, half), not range(base, base + half): 5x faster (vectorized)
                        b = q_o[base + j]
                        acc += lo[b] * xe_r[base + j] + hi[b] * xo_r[base + j]
                    z = numba.float32(SYMMETRIC_ZERO) if sym else numba.float32(zero[e, o, g])
                    total += scale[e, o, g] * (acc - z * xsum[r, g])
                out[r, o] = total


def quantized_matmul(x_ND: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     spec: QuantSpec, groups: list[tuple[int, int, int]]) -> torch.Tensor:
    """[N, O] fp32: rows start..start+count-1 of x times expert e's weight, for each (e, start, count) in groups.

    q / scale / zero are stacked [E, O, ...] (a single Linear passes them with E = 1).
    Rows outside every group are left zero.
    """
    if not AVAILABLE:
        raise RuntimeError("numba is not installed: use the 'dequant' kernel")
    _match_threads()
    x = x_ND.detach().float().contiguous()
    N, O = x.shape[0], q.shape[1]
    out = torch.zeros(N, O, dtype=torch.float32)
    if not groups or N == 0:
        return out
    experts, starts, counts = (torch.tensor(col, dtype=torch.int64).numpy() for col in zip(*groups))
    if spec.bits == 8:
        _int8_kernel(x.numpy(), q.numpy(), scale.numpy(), experts, starts, counts, out.numpy())
        return out
    xe, xo = x[:, 0::2].contiguous(), x[:, 1::2].contiguous()
    xsum = x.view(N, -1, spec.group_size).sum(-1).contiguous()
    z = zero if zero is not None else scale.new_zeros((1, 1, 1), dtype=torch.uint8)
    _int4_kernel(xe.numpy(), xo.numpy(), xsum.numpy(), q.numpy(), scale.numpy(), z.numpy(),
                 not spec.has_zero, spec.group_size, experts, starts, counts, out.numpy())
    return out


_threads = [0]


def _match_threads() -> None:
    """Numba runs on as many threads as torch is allowed (set_num_threads applies to both)."""
    want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if _threads[0] != want:
        numba.set_num_threads(want)
        _threads[0] = want
