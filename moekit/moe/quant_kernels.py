"""Compiled matmuls on quantized weights for a few rows per matrix (decoding): numba, or nothing.

`quantized_matmul(x_ND, q, scale, zero, spec, groups)` computes, for every
(expert, first row, row count) in `groups`, y[rows] = x[rows] @ W_e^T with W_e
the expert's weight in quant_format's layout, reading the integer codes
directly (no fp32 copy of the weight). Rows are the outer parallel loop's
partners: one thread owns an output channel and runs every row of its expert
against that channel's codes while they sit in cache, so a weight byte is
read once per call however many rows share it.

- int8: y = scale[o] * sum_i q[o, i] x[i].
- int4: y = sum_g scale[o, g] * (sum_j code[o, j] x[j] - zero[o, g] * sum_j x[j]);
  x is split once per call into its even and odd columns (the low and high
  nibbles of a byte), and its group sums are computed once per row. The
  inner step takes 16 bytes (32 weights, the smallest group) of two output
  channels at once: nibbles by mask and shift on int32 lanes (not a table
  lookup, which is a gather), converted to fp32, scaled, and accumulated
  lane-wise; the lanes are summed once per channel, not once per group.
  Same layout as on disk (no repacking): this runs about 10x faster than a
  table-lookup kernel with one reduction per group, and faster than int8 at
  one row (benchmarks/results/quant_kernels.md).

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

CHUNK = 16  # bytes (32 int4 weights) per inner step: the smallest group, so a chunk never straddles two scales

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

    @njit(inline="always", fastmath=True)
    def _int4_pair(qa, qb, sa, sb, xe_r, xo_r, per_group, acca, accb):  # pragma: no cover - compiled
        """acc[j] += scale * (lo * x_even + hi * x_odd) for two channels, over 16-byte chunks (32 weights).

        No reduction inside a chunk: the lanes are summed once per channel, at the end.
        """
        for c in range(qa.shape[0] // CHUNK):
            g = c // per_group
            s_a, s_b = sa[g], sb[g]
            base = c * CHUNK
            for j in range(CHUNK):  # a constant trip count: LLVM keeps the accumulators in vector registers
                x_e, x_o = xe_r[base + j], xo_r[base + j]
                b = qa[base + j]
                acca[j] += s_a * (numba.float32(np.int32(b & 15)) * x_e + numba.float32(np.int32(b >> 4)) * x_o)
                b = qb[base + j]
                accb[j] += s_b * (numba.float32(np.int32(b & 15)) * x_e + numba.float32(np.int32(b >> 4)) * x_o)

    @njit(inline="always", fastmath=True)
    def _int4_zero_term(s_o, z_o, sym, xsum_r):  # pragma: no cover - compiled
        """sum_g scale[g] * zero[g] * sum(x over group g): what the codes' offset adds."""
        zt = numba.float32(0.0)
        for g in range(s_o.shape[0]):
            z = numba.float32(SYMMETRIC_ZERO) if sym else numba.float32(z_o[g])
            zt += s_o[g] * z * xsum_r[g]
        return zt

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _int4_kernel(xe, xo, xsum, q, scale, zero, sym, group, experts, starts, counts, out):  # pragma: no cover
        A, O = experts.shape[0], q.shape[1]
        per_group = group // (2 * CHUNK)  # chunks per scale group
        P = (O + 1) // 2
        acc = np.zeros((A * P, 2, CHUNK), np.float32)
        for t in prange(A * P):  # two output channels per step share every x load (an odd last one pairs with itself)
            a, o = t // P, 2 * (t % P)
            e, ob = experts[a], min(o + 1, O - 1)
            za = zero[0, 0] if sym else zero[e, o]
            zb = zero[0, 0] if sym else zero[e, ob]
            for r in range(starts[a], starts[a] + counts[a]):
                acc_t = acc[t]
                acc_t[:] = 0
                _int4_pair(q[e, o], q[e, ob], scale[e, o], scale[e, ob], xe[r], xo[r], per_group, acc_t[0], acc_t[1])
                out[r, o] = acc_t[0].sum() - _int4_zero_term(scale[e, o], za, sym, xsum[r])
                out[r, ob] = acc_t[1].sum() - _int4_zero_term(scale[e, ob], zb, sym, xsum[r])


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
