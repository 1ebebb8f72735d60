"""The compiled integer-dot kernels (the C extension moekit.moe._qdot) seen from Python.

The extension quantizes each activation row to int8 per 32-value block and takes integer dot products
with the weights' own codes (AVX-512 VNNI, AVX-VNNI, AVX2 or plain C, chosen at run time by CPU
features; `MOEKIT_ISA=generic` or `force_isa` picks one). Weights are read in their stored layout:
moekit's int8 / int4 (quant_format.py) and GGUF's Q8_0, Q4_0, Q5_0, Q4_K, Q5_K and Q6_K blocks. Results differ
from dequantize-then-fp32 by the activations' int8 rounding (about 0.4% of a block's largest value),
as llama.cpp's do.

- `AVAILABLE`: the extension is built and loaded (setup.py builds it; without a C compiler it is
  absent and callers use the numba or dequantize kernels).
- `isa()`, `supported_isas()`, `force_isa(name)` (a context manager; tests force "generic"), `off()`
  (a context manager: kernel choice passes these kernels by).
- `moekit_weight(q, scale, zero, spec)` / `gguf_weight(w_EOB, qtype, in_features)` / `f32_weight(w_EOI)`
  (fp32 weights, fp32 activations, nothing rounded: the fp32 experts' decode path): the kernel's
  description of a stacked weight [E, O, ...] (pointers into the tensors: keep them alive).
- `groups_of(rows_E)`: the (expert, first row, rows) groups of rows grouped by expert.
- `matmul(x_NI, weight, groups_A3)`: y[rows] = x[rows] @ W_e^T for each (e, start, count); [N, O] fp32.
- `moe(x_ND, w_in, w_out, groups_A3, activation)`: one call for all of an MoE layer's active experts
  (w_in holds [gate | up] rows for "swiglu"; "gelu" is erf GELU); [N, D] fp32.
- `gguf_matmul` / `gguf_experts`: the same for raw GGUF block tensors [E, O, row_bytes].
- Threads: up to torch.get_num_threads(); the extension measures each call's cost per weight byte at
  each thread count and runs the cheapest (exploring the others now and then), so decoding drops to
  fewer threads when another process takes a core, and its workers sleep instead of spinning.

Not here: formats (quant_format.py, moekit.gguf), kernel choice (quantized.py).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

try:
    from . import _qdot
except ImportError:  # no compiler at install time: the numba / dequantize kernels run instead
    _qdot = None

AVAILABLE = _qdot is not None
_FMT = {"int8": 0, "int4": 1, "Q8_0": 2, "Q4_0": 3, "Q5_0": 4, "Q4_K": 5, "Q6_K": 6, "Q5_K": 7, "F32": 8}
GGUF_BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q5_0": (32, 22), "Q4_K": (256, 144), "Q6_K": (256, 210),
               "Q5_K": (256, 176)}  # (values, bytes)
GGUF_TYPES = tuple(GGUF_BLOCKS)
ACTIVATIONS = ("swiglu", "gelu")
_threads = [0]

if AVAILABLE and os.environ.get("MOEKIT_ISA"):
    _qdot.set_isa(os.environ["MOEKIT_ISA"])


_off = [0]


def isa() -> str:
    """The instruction set the kernels run; "none" where the extension is absent or switched off (`off`)."""
    return _qdot.isa() if AVAILABLE and not _off[0] else "none"


@contextlib.contextmanager
def off():
    """Kernel choice inside the block passes the native kernels by (`auto` picks numba or dequant instead)."""
    _off[0] += 1
    try:
        yield
    finally:
        _off[0] -= 1


def supported_isas() -> list[str]:
    return _qdot.supported() if AVAILABLE else []


@contextlib.contextmanager
def force_isa(name: str):
    """Runs the kernels built for `name` ("generic", "avx2", "avxvnni", "avx512vnni") inside the block."""
    old = _qdot.isa()
    _qdot.set_isa(name)
    try:
        yield
    finally:
        _qdot.set_isa(old)


def supports(qtype: str) -> bool:
    return AVAILABLE and not _off[0] and qtype in GGUF_TYPES


def fits(spec, in_features: int) -> bool:
    """Whether the kernels run a moekit weight of this spec and input width (whole 32-value blocks)."""
    return AVAILABLE and not _off[0] and in_features % 32 == 0 and (spec.bits == 8 or spec.group_size % 32 == 0)


def groups_of(rows_E: torch.Tensor) -> np.ndarray:
    """(expert, first row, rows) of every expert with rows, for rows grouped by expert: int64 [A, 3]."""
    out, start = [], 0
    for e, count in enumerate(rows_E.tolist()):
        if count:
            out.append((e, start, count))
        start += count
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def moekit_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec) -> tuple:
    """The kernel's record of a stacked moekit int8 / int4 weight (q [E, O, I or I/2], scale [E, O, 1 or I/G])."""
    E, O, X = q.shape
    if spec.bits == 8:
        return (_FMT["int8"], X, O, q.data_ptr(), X, O * X, scale.data_ptr(), 1, O, 0, 0)
    groups = scale.shape[-1]
    return (_FMT["int4"], 2 * X, O, q.data_ptr(), X, O * X, scale.data_ptr(), groups, O * groups,
            zero.data_ptr() if zero is not None else 0, (spec.group_size // 32).bit_length() - 1)


def f32_weight(w_EOI: torch.Tensor) -> tuple:
    """The kernel's record of a contiguous fp32 stacked weight [E, O, I] (plain dot products: nothing rounded)."""
    E, O, I = w_EOI.shape
    return (_FMT["F32"], I, O, w_EOI.data_ptr(), 4 * I, 4 * O * I, 0, 0, 0, 0, 0)


def gguf_weight(w_EOB: torch.Tensor, qtype: str, in_features: int) -> tuple:
    """The kernel's record of raw GGUF blocks w_EOB uint8 [E, O, row_bytes] of type `qtype`."""
    E, O, B = w_EOB.shape
    values, nbytes = GGUF_BLOCKS[qtype]
    if in_features % values or B != in_features // values * nbytes:
        raise ValueError(f"{qtype} rows of {in_features} values take {in_features // values * nbytes} bytes, not {B}")
    return (_FMT[qtype], in_features, O, w_EOB.data_ptr(), B, O * B, 0, 0, 0, 0, 0)


_ALL_ROWS: dict[int, np.ndarray] = {}


def _prepare(x_NI: torch.Tensor, groups_A3) -> tuple[torch.Tensor, np.ndarray]:
    want = torch.get_num_threads()
    if _threads[0] != want:
        _qdot.set_threads(want)
        _threads[0] = want
    x = (x_NI.detach() if x_NI.requires_grad else x_NI).float().contiguous()
    if groups_A3 is None:  # every row through expert 0 (one Linear)
        N = x.shape[0]
        groups = _ALL_ROWS.get(N)
        if groups is None:
            groups = _ALL_ROWS[N] = np.array([[0, 0, N]], dtype=np.int64)
        return x, groups
    return x, np.ascontiguousarray(np.asarray(groups_A3, dtype=np.int64).reshape(-1, 3))


def matmul(x_NI: torch.Tensor, weight: tuple, groups_A3) -> torch.Tensor:
    """[N, O] fp32: rows of each (e, start, count) group times expert e's weight (other rows zero).

    groups_A3 None: all rows, expert 0 (a single Linear).
    """
    x, groups = _prepare(x_NI, groups_A3)
    out = torch.empty(x.shape[0], weight[2]) if groups_A3 is None else torch.zeros(x.shape[0], weight[2])
    if groups.shape[0] and x.shape[0]:
        _qdot.matmul(weight, x.data_ptr(), x.shape[0], groups.ctypes.data, groups.shape[0], out.data_ptr())
    return out


def moe(x_ND: torch.Tensor, w_in: tuple, w_out: tuple, groups_A3, activation: str) -> torch.Tensor:
    """[N, D] fp32: each group's rows through expert e's w_in, the activation and w_out, in one call."""
    x, groups = _prepare(x_ND, groups_A3)
    out = torch.zeros(x.shape[0], w_out[2])
    if groups.shape[0] and x.shape[0]:
        _qdot.moe(activation, w_in, w_out, x.data_ptr(), x.shape[0], groups.ctypes.data, groups.shape[0], out.data_ptr())
    return out


def gguf_matmul(x_NI: torch.Tensor, w_EOB: torch.Tensor, qtype: str, groups_A3) -> torch.Tensor:
    return matmul(x_NI, gguf_weight(w_EOB, qtype, x_NI.shape[-1]), groups_A3)


def gguf_experts(x_ND, w_in_EHB, qtype_in, w_out_EDB, qtype_out, groups_A3, activation):
    """One fused call (None when the activation is not one the kernel fuses: then two gguf_matmul calls)."""
    if activation not in ACTIVATIONS:
        return None
    D = x_ND.shape[-1]
    F = w_in_EHB.shape[1] // 2 if activation == "swiglu" else w_in_EHB.shape[1]
    return moe(x_ND, gguf_weight(w_in_EHB, qtype_in, D), gguf_weight(w_out_EDB, qtype_out, F), groups_A3, activation)


def kernel_time() -> tuple[int, float]:
    """(calls, seconds) spent inside the kernels since import: a decode step's time less this is its overhead."""
    return _qdot.kernel_time() if AVAILABLE else (0, 0.0)
