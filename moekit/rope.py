"""Scaled rotary embeddings: YaRN (GPT-OSS) and PhiMoE's LongRoPE, computed as transformers computes them.

`build_rotary(head_dim, theta, scaling)` gives the plain `RotaryEmbedding`
when `scaling` is empty, else the variant its `rope_type` names. Both
variants keep the plain layout (`rotate_half`, cos/sin tables of width
head_dim) and multiply cos and sin by an attention factor.

- YaRN: inverse frequencies blended between interpolation and
  extrapolation by a linear ramp over the correction range (beta_fast,
  beta_slow, `truncate`), factor 0.1 * ln(factor) + 1 unless given.
- LongRoPE (PhiMoE): inverse frequencies divided by the short factors, and
  cos/sin scaled by `short_mscale`, or by `long_mscale` once the largest
  position of the call reaches `original_max_position_embeddings`. This is
  transformers' PhimoeRotaryEmbedding: it never switches to the long
  factors, only the mscale follows the length, so moekit does the same.

Not here: the plain rotary embedding and applying it (moekit.modules),
reading these settings from a config.json (moekit.hf).
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError
from .modules import RotaryEmbedding

ROPE_TYPES = ("default", "yarn", "longrope")


class YarnRotaryEmbedding(RotaryEmbedding):
    """YaRN-scaled RoPE (transformers' `_compute_yarn_parameters`)."""

    def __init__(self, head_dim: int, theta: float, scaling: dict) -> None:
        self.scaling = dict(scaling)
        self.factor = float(scaling["factor"])
        self.attention_factor = _yarn_attention_factor(scaling, self.factor)
        super().__init__(head_dim, theta)

    def compute_inv_freq(self) -> torch.Tensor:
        s, dim, base = self.scaling, self.head_dim, self.theta
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1
        original = s["original_max_position_embeddings"]

        def correction_dim(rotations):
            return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # as transformers: no division by zero
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (self.factor * pos_freqs)
        keep = 1 - ramp  # the share of extrapolation
        return interpolation * (1 - keep) + extrapolation * keep

    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype = torch.float32):
        freqs = positions_BT[..., None].float() * self.inv_freq.to(device=positions_BT.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def _yarn_attention_factor(s: dict, factor: float) -> float:
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.get("mscale") and s.get("mscale_all_dim"):
        return float(mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]))
    return mscale(factor)


class LongRopeRotaryEmbedding(RotaryEmbedding):
    """PhiMoE's LongRoPE as transformers computes it: short factors, mscale chosen by the call's largest position."""

    def __init__(self, head_dim: int, theta: float, scaling: dict) -> None:
        self.short_factor = [float(f) for f in scaling["short_factor"]]
        self.original_max = int(scaling["original_max_position_embeddings"])
        self.short_mscale = float(scaling["short_mscale"])
        self.long_mscale = float(scaling["long_mscale"])
        if len(self.short_factor) != head_dim // 2:
            raise ConfigError(f"longrope short_factor has {len(self.short_factor)} entries but head_dim / 2 = {head_dim // 2}")
        super().__init__(head_dim, theta)

    def compute_inv_freq(self) -> torch.Tensor:
        ext = torch.tensor(self.short_factor, dtype=torch.float32)
        shape = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        return 1.0 / (ext * self.theta**shape)

    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype = torch.float32):
        longest = int(positions_BT.max()) + 1 if positions_BT.numel() else 0
        mscale = self.long_mscale if longest > self.original_max else self.short_mscale
        freqs = positions_BT[..., None].float() * self.inv_freq.to(device=positions_BT.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * mscale).to(dtype), (emb.sin() * mscale).to(dtype)


def build_rotary(head_dim: int, theta: float, scaling: dict | None = None) -> RotaryEmbedding:
    """The rotary embedding a model's `rope_scaling` names ({} or rope_type "default": plain RoPE)."""
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return RotaryEmbedding(head_dim, theta)
    if kind == "yarn":
        return YarnRotaryEmbedding(head_dim, theta, scaling)
    if kind == "longrope":
        return LongRopeRotaryEmbedding(head_dim, theta, scaling)
    raise ConfigError(f"rope_scaling rope_type={kind!r} is unknown: accepted values are {', '.join(ROPE_TYPES)}")
