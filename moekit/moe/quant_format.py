"""Weight-only quantization formats: how a float weight becomes integers plus scales, and back.

A weight is any tensor `[..., O, I]` in nn.Linear's (out, in) layout (one
Linear, or all experts stacked as `[E, H, D]` / `[E, D, F]`). Two formats:

- int8, per output channel, symmetric: `q` int8 `[..., O, I]`, `scale` fp32
  `[..., O, 1]`; w = q * scale with scale = absmax(row) / 127.
- int4, group-wise along the input dimension (group size G = 32, 64 or 128):
  `q` uint8 `[..., O, I/2]` holding two 4-bit codes per byte (column 2j in
  the low nibble, 2j+1 in the high one), `scale` fp32 `[..., O, I/G]`, and
  with zero points `zero` uint8 `[..., O, I/G]`; w = (code - zero) * scale.
  Symmetric groups have no stored zero: their zero is 8 (codes are q + 8,
  q in [-8, 7], scale = absmax / 7). Zero-point groups map [min, max] to
  codes 0..15.

`dequantize` is the reference every kernel is tested against. Only tensor
ops without data-dependent control flow are used, so quantizing a weight on
the meta device gives the stored tensors' shapes and dtypes (how a quantized
checkpoint is rebuilt before its tensors are read). Not here: kernels
(quant_kernels.py), the modules that hold quantized weights (quantized.py),
choosing which weights to quantize (moekit.quantize).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
SYMMETRIC_ZERO = 8  # the implicit zero of symmetric int4 codes
FORMAT_NAME = "moekit-weight-only-v1"


@dataclass(frozen=True)
class QuantSpec:
    """bits 8 (per output channel, symmetric) or 4 (group-wise, group_size 32/64/128, symmetric or zero points)."""

    bits: int = 8
    group_size: int | None = None  # int4 only
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"bits={self.bits!r} is not supported: accepted values are 8 (int8) and 4 (int4)")
        if self.bits == 8:
            if self.group_size is not None:
                raise ConfigError(f"group_size={self.group_size} applies to int4 only: int8 has one scale per output channel")
            if not self.symmetric:
                raise ConfigError("int8 is symmetric per output channel: zero points apply to int4 only")
        elif self.group_size not in GROUP_SIZES:
            raise ConfigError(f"group_size={self.group_size!r} is not supported for int4: accepted values are "
                              f"{', '.join(map(str, GROUP_SIZES))}")

    @property
    def has_zero(self) -> bool:
        return self.bits == 4 and not self.symmetric

    @property
    def name(self) -> str:
        if self.bits == 8:
            return "int8"
        return f"int4-g{self.group_size}" + ("" if self.symmetric else "-zp")

    def to_dict(self) -> dict:
        return {"format": FORMAT_NAME, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "quantization") -> "QuantSpec":
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ConfigError(f"{where} is not a moekit quantization section (expected format {FORMAT_NAME!r})")
        return cls(bits=data.get("bits"), group_size=data.get("group_size"), symmetric=data.get("symmetric", True))


def check_width(spec: QuantSpec, in_features: int, what: str) -> None:
    """An int4 group must divide the input width; otherwise a ConfigError naming the weight and the sizes that fit."""
    if spec.bits == 4 and in_features % spec.group_size:
        fits = [g for g in GROUP_SIZES if in_features % g == 0]
        hint = f"group sizes that divide it: {', '.join(map(str, fits))}" if fits else "no int4 group size divides it (use --bits 8)"
        raise ConfigError(f"group_size={spec.group_size} does not divide the input width {in_features} of {what}; {hint}")


def quantize(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """{'q', 'scale'[, 'zero']} for a float weight [..., O, I] (see the module docstring for the layout)."""
    if w.is_meta:
        return _stored_on_meta(w.shape, spec)
    w = w.detach().float()
    if spec.bits == 8:
        scale = w.abs().amax(dim=-1, keepdim=True) / 127
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
        return {"q": q, "scale": scale}
    *lead, O, I = w.shape
    g = w.reshape(*lead, O, I // spec.group_size, spec.group_size)
    if spec.symmetric:
        scale = g.abs().amax(dim=-1) / 7
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.round(g / scale[..., None]).clamp_(-8, 7) + SYMMETRIC_ZERO
        out = {"scale": scale}
    else:
        lo, hi = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)
        scale = (hi - lo) / 15
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.round(-lo / scale).clamp_(0, 15)
        codes = (torch.round(g / scale[..., None]) + zero[..., None]).clamp_(0, 15)
        out = {"scale": scale, "zero": zero.to(torch.uint8)}
    out["q"] = pack_int4(codes.to(torch.uint8).reshape(*lead, O, I))
    return out


def _stored_on_meta(shape: torch.Size, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The stored tensors' shapes and dtypes, made directly (the ops of `quantize` on meta import torch._dynamo)."""
    *lead, O, I = shape

    def meta(*dims, dtype=torch.float32):
        return torch.empty(*lead, O, *dims, dtype=dtype, device="meta")

    if spec.bits == 8:
        return {"q": meta(I, dtype=torch.int8), "scale": meta(1)}
    groups = I // spec.group_size
    out = {"scale": meta(groups)}
    if spec.has_zero:
        out["zero"] = meta(groups, dtype=torch.uint8)
    out["q"] = meta(I // 2, dtype=torch.uint8)
    return out


def dequantize(tensors: dict[str, torch.Tensor], spec: QuantSpec) -> torch.Tensor:
    """The fp32 weight [..., O, I] the stored tensors stand for: the reference for every kernel."""
    q, scale = tensors["q"], tensors["scale"]
    if spec.bits == 8:
        return q.float() * scale
    codes = unpack_int4(q).float()
    *lead, O, I = codes.shape
    g = codes.reshape(*lead, O, I // spec.group_size, spec.group_size)
    zero = tensors["zero"].float() if spec.has_zero else torch.full_like(scale, float(SYMMETRIC_ZERO))
    return ((g - zero[..., None]) * scale[..., None]).reshape(*lead, O, I)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., I] -> bytes [..., I/2]: column 2j in the low nibble, 2j+1 in the high one."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: bytes [..., P] -> uint8 codes [..., 2P]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def stored_names(spec: QuantSpec) -> tuple[str, ...]:
    """The tensors one quantized weight stores, as suffixes of its name."""
    return ("q", "scale", "zero") if spec.has_zero else ("q", "scale")
