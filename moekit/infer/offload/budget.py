"""Sizes and budgets of expert offloading: layer shapes, byte/bandwidth/duration parsing, the fast-tier budget, errors.

Not here: where the weights live (tiers.py, disk.py), the offloader (offloader.py).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch

from ...errors import MoekitError
from ...moe.quant_format import QuantSpec, quantize, stored_names


class OffloadError(MoekitError):
    """Offloading cannot be set up as asked (no MoE layers, a bad tier, ...)."""


class BudgetError(OffloadError, ValueError):
    """An expert budget that cannot be parsed or is too small."""


class SlowTierError(OffloadError):
    """A slow-tier read failed: the file changed, disappeared or was cut short."""


# ---------------------------------------------------------------- sizes


@dataclass(frozen=True)
class LayerShape:
    """One MoE layer's expert weights: w_in [E, H, D] and w_out [E, D, F], in `dtype`, quantized by `spec`,
    or GGUF blocks of the types `gguf` (gate, up, down).

    `parts()` names the tensors one expert is stored as, in the order every slow tier reads them:
    full precision ("w_in_EHD", "w_out_EDF"); quantized (moekit.moe.quant_format) the codes, scales
    [and zero points] of w_in, then of w_out ("w_in_EHD_q", "w_in_EHD_scale", ...); GGUF blocks
    (moekit.gguf.storage.GGUFExperts) uint8 rows of blocks ("w_in_EHB", "w_out_EDB", or "w_gate_EFB",
    "w_up_EFB", "w_out_EDB" when gate and up differ in type).
    """

    num_experts: int
    H: int
    D: int
    F: int
    dtype: torch.dtype
    min_slots: int  # experts one token needs at once (top-k)
    spec: QuantSpec | None = None  # quantized experts (int8 / int4), None = full precision
    gguf: tuple[str, str, str] | None = None  # GGUF block types of gate, up, down (spec is then None)

    def parts(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(state name suffix, per-expert shape, dtype) of each tensor one expert is stored as."""
        return list(_parts(self.H, self.D, self.F, self.dtype, self.spec, self.gguf))

    @property
    def bytes_per_expert(self) -> int:
        return sum(math.prod(shape) * _itemsize(dtype) for _, shape, dtype in self.parts())

    @property
    def stored_as(self) -> str | None:
        """How the experts are stored when not in a float dtype ("int4 (group 32)", "GGUF Q4_K/Q6_K"), else None."""
        if self.gguf is not None:
            return "GGUF " + "/".join(dict.fromkeys(self.gguf))
        return None if self.spec is None else self.spec.name

    def full_precision(self, dtype: torch.dtype = torch.float32) -> "LayerShape":
        """The same layer unquantized (what a full-precision checkpoint stores)."""
        return LayerShape(self.num_experts, self.H, self.D, self.F, dtype, self.min_slots)

    def quantized(self, spec: QuantSpec) -> "LayerShape":
        return LayerShape(self.num_experts, self.H, self.D, self.F, torch.float32, self.min_slots, spec)


@functools.lru_cache(maxsize=None)
def _parts(H: int, D: int, F: int, dtype: torch.dtype, spec: QuantSpec | None, gguf: tuple | None = None) -> tuple:
    if gguf is not None:
        from ...gguf.blocks import row_bytes

        gate, up, down = gguf
        if gate == up:
            return (("w_in_EHB", (H, row_bytes(gate, D)), torch.uint8), ("w_out_EDB", (D, row_bytes(down, F)), torch.uint8))
        return (("w_gate_EFB", (F, row_bytes(gate, D)), torch.uint8), ("w_up_EFB", (F, row_bytes(up, D)), torch.uint8),
                ("w_out_EDB", (D, row_bytes(down, F)), torch.uint8))
    weights = (("w_in_EHD", (H, D)), ("w_out_EDF", (D, F)))
    if spec is None:
        return tuple((name, shape, dtype) for name, shape in weights)
    out = []
    for name, shape in weights:  # quantizing on the meta device gives the stored shapes and dtypes
        stored = quantize(torch.empty(shape, device="meta"), spec)
        out += [(f"{name}_{suffix}", tuple(stored[suffix].shape), stored[suffix].dtype) for suffix in stored_names(spec)]
    return tuple(out)


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


def _plain_number(text: str) -> float | None:
    """The value of a unitless number ("0.25", "3e9"), else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Budget:
    """A fast-tier size: a fraction of all experts ("25%", or a bare number below 1: "0.25"), or bytes ("2GB", "500000000")."""

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
        number = _plain_number(text)
        if number is not None and 0 < number < 1:  # a bare fraction: 0.25 means 25% of the experts
            return cls(fraction=number, text=f"{100 * number:.4g}%")
        if isinstance(value, float) and value == 1:
            return cls(fraction=1.0, text="100%")
        if number is not None and number != int(number):
            raise BudgetError(
                f"expert budget {text!r} is invalid: give a fraction below 1 (0.25), a percentage (25%), "
                f"or a size in bytes (a whole number, or with a unit: 512MB, 2GB)"
            )
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
