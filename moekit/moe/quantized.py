"""Modules holding weight-only quantized weights: QuantizedExperts and QuantizedLinear.

`QuantizedExperts` is an experts storage (moekit.moe.storage.ExpertsStorage,
as resident `Experts` and `OffloadedExperts` are): the same stacked layout, `w_in_EHD` / `w_out_EDF`
stored as integer codes plus scales (quant_format.py; state names
`w_in_EHD_q`, `w_in_EHD_scale`[, `w_in_EHD_zero`]), answering the two calls
an MoE layer's dispatcher makes, `kernel_for(x, counts_E)` and
`forward(x_SD, rows_E, kernel=...)`. `QuantizedLinear` stands in for an
nn.Linear (attention, dense MLPs, the head). All tensors are buffers: nothing
here trains, and casting a model's parameters (Engine.load's dtype) leaves
the codes alone. Inputs of any float dtype compute in fp32 and come back in
their own dtype.

Kernels, by name (the module's `kernel` attribute, or `kernel=` per call):
- `dequant`: the reference (the oracle in tests, as `loop` is for fp32
  experts): each active expert's weights dequantized to fp32, then the same
  matmuls as `loop`.
- `native`: the compiled integer-dot kernels (moekit.moe.native: activations
  quantized per 32-value block to int8, integer dot products with the codes,
  AVX-512 VNNI / AVX-VNNI / AVX2 / plain C by CPU), all of an MoE layer's
  active experts (gate, up, activation, down) in one call. CPU only; where
  the extension is not built, or a width is not whole 32-value blocks, `numba`
  runs instead.
- `numba`: quant_kernels.quantized_matmul, reading the codes directly with
  fp32 activations, all active experts in one parallel call per matmul (CPU
  only: elsewhere, and where numba is not installed, `dequant` runs instead).
- `auto`: `native` where its vector kernels run (the plain-C build is slower
  than numba), at any row count (NATIVE_MAX_ROWS: it beats dequantize-then-
  BLAS even at 512 rows); else `numba` up to NUMBA_MAX_ROWS[bits] rows;
  otherwise `dequant`, whose fp32 BLAS matmul wins once rows are many
  because the dequantized weight is then reused across rows. The row limits
  come from benchmarks/quant_kernels.py (see its results).

Not here: the format (quant_format.py), the kernels (quant_kernels.py),
choosing which modules to quantize (moekit.quantize).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..meta import empty_on, on_meta
from . import native, quant_kernels
from .experts import activate
from .storage import ExpertsStorage, check_kernel_name, refuse
from .quant_format import QuantSpec, check_width, dequantize, quantize, stored_names

QUANT_KERNELS = ("auto", "dequant", "numba", "native")

# `auto` uses the numba kernel up to this many rows per matrix, by bit width (the int4 kernel does more
# work per weight than the int8 one); measured in benchmarks/results/quant_kernels.md.
NUMBA_MAX_ROWS = {8: 64, 4: 64}  # numba beats dequant at every measured row count up to 64, int4 included (quant_kernels.md)
# native at every row count: at 512 rows it still beats dequantize-then-BLAS 1.64x (int8) and 1.52x (int4), which
# pays a full dequantization of each weight per call (benchmarks/results/quant_kernels.md, 4096x4096, 2 threads)
NATIVE_MAX_ROWS = 1 << 30


def _check_kernel(name: str, owner: str = "QuantizedExperts") -> None:
    check_kernel_name(owner, name, QUANT_KERNELS, " for quantized weights")


def resolve_kernel(name: str, most_rows: int, spec: QuantSpec, widths: tuple[int, ...], device: torch.device,
                   owner: str = "QuantizedExperts") -> str:
    """The kernel a call runs: `auto` by the row rule; `native` falls back to `numba`, `numba` to `dequant`.

    widths: the input widths of the weights the call multiplies (native needs whole 32-value blocks).
    """
    _check_kernel(name, owner)
    if name == "auto":
        vector = native.isa() not in ("generic", "none")
        name = "native" if vector and most_rows <= NATIVE_MAX_ROWS else "numba" if most_rows <= NUMBA_MAX_ROWS[spec.bits] else "dequant"
    if name == "native" and (device.type != "cpu" or not all(native.fits(spec, w) for w in widths)):
        name = "numba"
    if name == "numba" and (not quant_kernels.AVAILABLE or device.type != "cpu"):
        return "dequant"
    return name


class _QuantizedWeights(nn.Module):
    """Registers one or more quantized weights as buffers `<name>_q`, `<name>_scale`[, `<name>_zero`]."""

    quantized_weights = True  # its `num_weights` are buffers, not parameters (for parameter counts)

    def __init__(self, spec: QuantSpec, kernel: str):
        super().__init__()
        _check_kernel(kernel, type(self).__name__)
        self.spec = spec
        self.kernel = kernel

    def _store(self, name: str, w: torch.Tensor) -> None:
        for suffix, t in quantize(w, self.spec).items():
            self.register_buffer(f"{name}_{suffix}", t)

    def _parts(self, name: str) -> dict[str, torch.Tensor]:
        buffers = self._buffers  # (not getattr: nn.Module's attribute lookup costs more than a decode step's kernel call)
        return {suffix: buffers[f"{name}_{suffix}"] for suffix in stored_names(self.spec)}

    def _zero(self, name: str) -> torch.Tensor | None:
        return getattr(self, f"{name}_zero") if self.spec.has_zero else None

    def _native_weight(self, name: str) -> tuple:
        """native's record of weight `name`, kept while its codes stay where they are (a decode step makes dozens)."""
        q = self._buffers[f"{name}_q"]
        cache = self.__dict__.setdefault("_native_records", {})
        hit = cache.get(name)
        if hit is None or hit[0] != q.data_ptr():
            p = self._parts(name)
            hit = cache[name] = (q.data_ptr(), native.moekit_weight(q, p["scale"], p.get("zero"), self.spec))
        return hit[1]


class StackedShape:
    """`shape_EHDF` of an experts storage that keeps (E, H, D, F) in `_shape`: the weights its codes or blocks
    stand for. E is read from its stacked buffer `_stacked`, so an expert-parallel shard (which keeps its
    experts' slice of every stacked buffer) counts its own experts."""

    _shape: tuple[int, int, int, int]
    _stacked: str

    @property
    def shape_EHDF(self) -> tuple[int, int, int, int]:
        """(experts, w_in rows H, hidden D, expert width F)."""
        return (self._buffers[self._stacked].shape[0], *self._shape[1:])


class QuantizedExperts(StackedShape, ExpertsStorage, _QuantizedWeights):
    """E expert MLPs with weight-only quantized stacked weights; built from a resident `Experts`."""

    kernels = QUANT_KERNELS
    _stacked = "w_in_EHD_q"

    def __init__(self, experts, spec: QuantSpec, kernel: str = "auto"):
        super().__init__(spec, kernel)
        self.activation = experts.activation
        self._act = experts._act  # a name, or GPT-OSS's clamped SwiGLU (a callable holding its limit)
        biased = experts.b_in_EH is not None  # GPT-OSS's expert biases, kept in fp32 beside the codes (None: no state)
        self.register_buffer("b_in_EH", experts.b_in_EH.detach().float().clone() if biased else None)
        self.register_buffer("b_out_ED", experts.b_out_ED.detach().float().clone() if biased else None)
        E, H, D = experts.w_in_EHD.shape
        F_ = experts.w_out_EDF.shape[2]
        try:
            check_width(spec, D, f"the experts' w_in [{E}, {H}, {D}]")
            check_width(spec, F_, f"the experts' w_out [{E}, {D}, {F_}]")
        except ConfigError as e:
            raise refuse("QuantizedExperts", f"{spec.name}: {e}") from None
        self._shape = (E, H, D, F_)
        self._store("w_in_EHD", experts.w_in_EHD)
        self._store("w_out_EDF", experts.w_out_EDF)

    @classmethod
    def empty(cls, num_experts: int, D: int, F: int, activation: str, spec: QuantSpec, kernel: str = "auto",
              device: torch.device | str | None = "cpu") -> "QuantizedExperts":
        """E experts' quantized storage, zero-filled on `device` (device="meta": shapes only, no memory).

        What offloading's fast slots and slow tiers are made of: filled part by part, one expert at a time.
        """
        from .experts import Experts

        with on_meta():  # (not torch.device("meta"): computing on meta imports torch._dynamo, see moekit.meta)
            stand_in = Experts(num_experts, D, F, activation=activation, kernel="loop")
            module = cls(stand_in, spec, kernel)
        if str(device) == "meta":
            return module
        module = empty_on(module, device)
        for buf in module.buffers():
            buf.zero_()
        return module

    @property
    def has_bias(self) -> bool:
        return self._buffers.get("b_in_EH") is not None

    def kernel_for(self, x: torch.Tensor, counts_E: torch.Tensor | None = None, kernel: str | None = None) -> str:
        """`kernel` (or the module's) with `auto` resolved; x lends its row count when counts are absent."""
        most = int(counts_E.max()) if counts_E is not None and counts_E.numel() else x.shape[0]
        _, _, D, F_ = self._shape
        return resolve_kernel(kernel or self.kernel, most, self.spec, (D, F_), x.device)

    def forward(self, x_ND: torch.Tensor, rows_E: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        """x_ND holds rows_E[e] consecutive rows per expert; returns [N, D] in x's dtype."""
        name = self.kernel_for(x_ND, rows_E, kernel)
        fn = {"numba": self._numba, "native": self._native}.get(name, self._dequant)
        return fn(x_ND, native.groups_of(rows_E)).to(x_ND.dtype)

    def dequantized(self, name: str, e: int) -> torch.Tensor:
        """Expert e's fp32 weight `name` (w_in_EHD or w_out_EDF), dequantized."""
        return dequantize({k: v[e] for k, v in self._parts(name).items()}, self.spec)

    def _bias(self, name: str, e: int) -> torch.Tensor | None:
        b = self._buffers.get(name)
        return None if b is None else b[e]

    def _biased(self, y_NX: torch.Tensor, name: str, groups) -> torch.Tensor:
        """y with each group's rows plus its expert's bias `name` (GPT-OSS), or y as it is."""
        b = self._buffers.get(name)
        if b is not None:
            for e, start, count in groups:
                y_NX[start : start + count] += b[e]
        return y_NX

    def _dequant(self, x_ND, groups) -> torch.Tensor:
        x = x_ND.float()
        out_ND = x.new_zeros(x.shape[0], self._shape[2])
        for e, start, count in groups:
            h = F.linear(x[start : start + count], self.dequantized("w_in_EHD", e), self._bias("b_in_EH", e))
            out_ND[start : start + count] = F.linear(activate(h, self._act), self.dequantized("w_out_EDF", e),
                                                     self._bias("b_out_ED", e))
        return out_ND

    def _numba(self, x_ND, groups) -> torch.Tensor:
        mm = quant_kernels.quantized_matmul
        p_in, p_out = self._parts("w_in_EHD"), self._parts("w_out_EDF")
        h = self._biased(mm(x_ND, p_in["q"], p_in["scale"], p_in.get("zero"), self.spec, groups), "b_in_EH", groups)
        y = mm(activate(h, self._act), p_out["q"], p_out["scale"], p_out.get("zero"), self.spec, groups)
        return self._biased(y, "b_out_ED", groups)


    def _native(self, x_ND, groups) -> torch.Tensor:
        """One call for every active expert (gate, up, activation, down); two around a Python activation otherwise."""
        w_in, w_out = self._native_weight("w_in_EHD"), self._native_weight("w_out_EDF")
        if self.activation in native.ACTIVATIONS and self.b_in_EH is None:
            return native.moe(x_ND, w_in, w_out, groups, self.activation)
        h = self._biased(native.matmul(x_ND, w_in, groups), "b_in_EH", groups)
        return self._biased(native.matmul(activate(h, self._act), w_out, groups), "b_out_ED", groups)


class QuantizedLinear(_QuantizedWeights):
    """An nn.Linear with a weight-only quantized weight (`weight_q`, `weight_scale`[, `weight_zero`]); bias kept."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec, kernel: str = "auto", what: str = "a Linear"):
        super().__init__(spec, kernel)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        check_width(spec, self.in_features, f"{what} [{self.out_features}, {self.in_features}]")
        self._store("weight", linear.weight[None])  # stored [1, O, ...]: the experts' kernels take it as is
        self.bias = linear.bias

    @property
    def num_weights(self) -> int:
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x_NI = x.reshape(-1, self.in_features)
        N = x_NI.shape[0]
        name = resolve_kernel(self.kernel, N, self.spec, (self.in_features,), x.device, "QuantizedLinear")
        if name == "native":
            return self._add_bias(native.matmul(x_NI, self._native_weight("weight"), None), x.dtype).view(*lead, self.out_features)
        p = self._parts("weight")
        if name == "numba":
            y = quant_kernels.quantized_matmul(x_NI, p["q"], p["scale"], p.get("zero"), self.spec, ((0, 0, N),))
        else:
            y = F.linear(x_NI.float(), dequantize(p, self.spec)[0])
        return self._add_bias(y, x.dtype).view(*lead, self.out_features)

    def _add_bias(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias.float()
        return y if y.dtype == dtype else y.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.name}, kernel={self.kernel}"
