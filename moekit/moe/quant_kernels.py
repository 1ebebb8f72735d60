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
  inner step takes 16 bytes (32 weights, the smallest group) of four output
  channels at once: nibbles by mask and shift on int32 lanes (not a table
  lookup, which is a gather), converted to fp32, scaled, and accumulated
  lane-wise; the lanes are summed once per channel, not once per group.
  Same layout as on disk (no repacking). Probed on a loaded 2-core EPYC (best of 60 calls,
  4096x4096, weights cycling through 4 matrices so they come from memory, 1 thread): about 10x
  faster than the previous kernel (a 256-entry nibble table, a gather, and one reduction per group),
  1.6-1.9 ms against int8's 1.8-1.9 ms; four channels per step beat two by about 10%. Compute, not
  the weight read, still bounds it on one thread (8 vector ops per 16 weights against int8's 6);
  benchmarks/quant_kernels.py is the measurement to trust, on an idle machine.
- Per-call overhead matters at decode (a model makes dozens of these calls per token): the int4
  input split runs compiled inside the kernel call and the groups become one numpy array, which
  took a 128x128 call from about 46 to 23 us (int8: 21 to 14 us; fp32 F.linear: 4 us).
- Each kernel comes twice, compiled from one body: a `prange` one and a serial one that one
  thread (torch.get_num_threads() == 1) runs, so that numba's thread pool never starts there
  (its spinning OpenMP workers took the decoding thread's core on a shared 2-core machine).

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

from .quant_format import GROUP_SIZES, SYMMETRIC_ZERO, QuantSpec

CHUNK = 16  # bytes (32 int4 weights) per inner step: the smallest group, so a chunk never straddles two scales

try:  # numba is an install dependency, but the package must still import (and fall back) without it
    import numba
    from numba import njit, prange

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None
    AVAILABLE = False


if AVAILABLE:

    @njit(inline="always", fastmath=True)
    def _int8_channel(t, x, q, scale, groups, out):  # pragma: no cover - compiled
        """Output channel t % O of active expert t // O, for every row of that expert."""
        O, I = q.shape[1], q.shape[2]
        a, o = t // O, t % O
        e, first = groups[a, 0], groups[a, 1]
        s = scale[e, o, 0]
        for r in range(first, first + groups[a, 2]):
            acc = numba.float32(0.0)
            for i in range(I):
                acc += numba.float32(q[e, o, i]) * x[r, i]
            out[r, o] = acc * s

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _int8_kernel(x, q, scale, groups, out):  # pragma: no cover - compiled
        for t in prange(groups.shape[0] * q.shape[1]):
            _int8_channel(t, x, q, scale, groups, out)

    @njit(fastmath=True, cache=True, nogil=True)
    def _int8_serial(x, q, scale, groups, out):  # pragma: no cover - compiled
        for t in range(groups.shape[0] * q.shape[1]):
            _int8_channel(t, x, q, scale, groups, out)

    @njit(inline="always", fastmath=True)
    def _nibbles(b, x_e, x_o):  # pragma: no cover - compiled
        """low nibble * x_even + high nibble * x_odd, unpacked by mask and shift on int32 lanes (not a table gather)."""
        return numba.float32(np.int32(b & 15)) * x_e + numba.float32(np.int32(b >> 4)) * x_o

    @njit(inline="always", fastmath=True)
    def _int4_quad(q0, q1, q2, q3, s0_, s1_, s2_, s3_, xe_r, xo_r, group_shift, acc_4):  # pragma: no cover - compiled
        """acc_4[i, j] += scale * nibbles for four channels (codes q0..q3, scales s0_..s3_), 16 bytes (32 weights) a step.

        Four channels per step share each x load; no reduction inside a chunk: the lanes are summed once
        per channel, at the end.
        """
        for c in range(q0.shape[0] // CHUNK):
            g = c >> group_shift  # chunks per group are 1, 2 or 4: a shift, not a division (that costs more than the chunk)
            s0, s1, s2, s3 = s0_[g], s1_[g], s2_[g], s3_[g]
            base = c * CHUNK
            for j in range(CHUNK):  # a constant trip count: LLVM keeps the accumulators in vector registers
                x_e, x_o = xe_r[base + j], xo_r[base + j]
                acc_4[0, j] += s0 * _nibbles(q0[base + j], x_e, x_o)
                acc_4[1, j] += s1 * _nibbles(q1[base + j], x_e, x_o)
                acc_4[2, j] += s2 * _nibbles(q2[base + j], x_e, x_o)
                acc_4[3, j] += s3 * _nibbles(q3[base + j], x_e, x_o)

    @njit(inline="always", fastmath=True)
    def _int4_zero_term(s_o, z_o, sym, xsum_r):  # pragma: no cover - compiled
        """sum_g scale[g] * zero[g] * sum(x over group g): what the codes' offset adds."""
        zt = numba.float32(0.0)
        for g in range(s_o.shape[0]):
            z = numba.float32(SYMMETRIC_ZERO) if sym else numba.float32(z_o[g])
            zt += s_o[g] * z * xsum_r[g]
        return zt

    @njit(fastmath=True, cache=True, nogil=True)
    def _split_rows(x, group):  # pragma: no cover - compiled
        """x's even columns, odd columns and group sums (compiled: three torch calls cost more than this at decode)."""
        N, H = x.shape[0], x.shape[1] // 2
        xe, xo = np.empty((N, H), np.float32), np.empty((N, H), np.float32)
        xsum = np.zeros((N, x.shape[1] // group), np.float32)
        for r in range(N):
            for j in range(H):
                xe[r, j], xo[r, j] = x[r, 2 * j], x[r, 2 * j + 1]
                xsum[r, (2 * j) // group] += x[r, 2 * j] + x[r, 2 * j + 1]
        return xe, xo, xsum

    @njit(inline="always", fastmath=True)
    def _int4_step(t, Q, q, scale, zero, sym, group_shift, groups, xe, xo, xsum, acc_t, out):  # pragma: no cover
        """Output channels 4(t % Q) .. +3 of active expert t // Q (the last ones repeat channel O-1 when 4 does not divide O)."""
        O = q.shape[1]
        a, o = t // Q, 4 * (t % Q)
        e, first = groups[a, 0], groups[a, 1]
        o0, o1, o2, o3 = o, min(o + 1, O - 1), min(o + 2, O - 1), min(o + 3, O - 1)
        for r in range(first, first + groups[a, 2]):
            acc_t[:] = 0
            _int4_quad(q[e, o0], q[e, o1], q[e, o2], q[e, o3], scale[e, o0], scale[e, o1], scale[e, o2], scale[e, o3],
                       xe[r], xo[r], group_shift, acc_t)
            for i in range(4):
                oi = min(o + i, O - 1)
                za = zero[0, 0] if sym else zero[e, oi]
                out[r, oi] = acc_t[i].sum() - _int4_zero_term(scale[e, oi], za, sym, xsum[r])

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _int4_kernel(x, q, scale, zero, sym, group, group_shift, groups, out):  # pragma: no cover
        xe, xo, xsum = _split_rows(x, group)
        Q = (q.shape[1] + 3) // 4
        acc = np.zeros((groups.shape[0] * Q, 4, CHUNK), np.float32)
        for t in prange(groups.shape[0] * Q):  # four output channels per step
            _int4_step(t, Q, q, scale, zero, sym, group_shift, groups, xe, xo, xsum, acc[t], out)

    @njit(fastmath=True, cache=True, nogil=True)
    def _int4_serial(x, q, scale, zero, sym, group, group_shift, groups, out):  # pragma: no cover
        xe, xo, xsum = _split_rows(x, group)
        Q = (q.shape[1] + 3) // 4
        acc_t = np.zeros((4, CHUNK), np.float32)  # one thread: one accumulator block, reused
        for t in range(groups.shape[0] * Q):
            _int4_step(t, Q, q, scale, zero, sym, group_shift, groups, xe, xo, xsum, acc_t, out)


def quantized_matmul(x_ND: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     spec: QuantSpec, groups) -> torch.Tensor:
    """[N, O] fp32: rows start..start+count-1 of x times expert e's weight, for each (e, start, count) in groups.

    groups: (e, start, count) triples (a list, or an int64 array [A, 3]). q / scale / zero are stacked
    [E, O, ...] (a single Linear passes them with E = 1). Rows outside every group are left zero.
    Lean on purpose: a decoded token makes dozens of these calls, each a few microseconds of kernel.
    """
    if not AVAILABLE:
        raise RuntimeError("numba is not installed: use the 'dequant' kernel")
    serial = _match_threads() == 1
    x = (x_ND.detach() if x_ND.requires_grad else x_ND).float().contiguous()
    N, O = x.shape[0], q.shape[1]
    out = np.zeros((N, O), np.float32)
    groups_A3 = np.asarray(groups, dtype=np.int64).reshape(-1, 3)  # one array: per-call overhead counts at decode
    if groups_A3.shape[0] and N:
        if spec.bits == 8:
            (_int8_serial if serial else _int8_kernel)(x.numpy(), q.numpy(), scale.numpy(), groups_A3, out)
        else:
            z = zero.numpy() if zero is not None else _NO_ZERO
            (_int4_serial if serial else _int4_kernel)(x.numpy(), q.numpy(), scale.numpy(), z, not spec.has_zero,
                                                       spec.group_size, _CHUNK_SHIFT[spec.group_size], groups_A3, out)
    return torch.from_numpy(out)


_NO_ZERO = np.zeros((1, 1, 1), np.uint8)  # the zero-point argument of symmetric int4 (unused)


def _chunk_shift(group_size: int) -> int:
    """log2 of the 16-byte chunks per int4 scale group (group sizes 32, 64, 128 -> 0, 1, 2)."""
    chunks = group_size // (2 * CHUNK)
    assert chunks * 2 * CHUNK == group_size and chunks & (chunks - 1) == 0, group_size
    return chunks.bit_length() - 1


_CHUNK_SHIFT = {g: _chunk_shift(g) for g in GROUP_SIZES}


_threads = [0]


def _match_threads() -> int:
    """Numba's thread count: as many as torch is allowed (set_num_threads applies to both); returns it.

    At one thread the callers run the serial kernels, which never start numba's thread pool: its
    OpenMP workers wait by spinning, and on a small, shared CPU that spinning took the core the
    decoding thread needed (int4 decode 2x slower on 2 loaded cores, and erratic).
    """
    want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if want > 1 and _threads[0] != want:
        numba.set_num_threads(want)
        _threads[0] = want
    return want
