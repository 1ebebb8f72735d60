"""Multi-head latent attention (DeepSeek-V2 / V3) and its latent KV cache.

MLA compresses keys and values into one latent vector per token
(`kv_lora_rank` numbers, after an RMSNorm) plus one RoPE key shared by all
heads (`qk_rope_head_dim`); each head's key is [up-projected latent (nope
dims) | shared RoPE key] and its value the up-projected latent. Queries are
low-rank (`q_lora_rank`: q_a_proj -> RMSNorm -> q_b_proj) or full rank
(V2-Lite: q_proj). RoPE uses DeepSeek's interleaved pair layout (or the
rotate-half one when `rope_interleave` is off) and YaRN when configured,
with its softmax-scale correction (mscale_all_dim).

`LatentKVCache` keeps only [latent | RoPE key] per token and layer. A
multi-token forward (training, prefill) expands keys and values per head; a
one-token decode step with a cache absorbs the key up-projection into the
query and the value up-projection into the output (as vLLM and SGLang do),
so it attends over the latent cache directly: one shared "key head" of
kv_lora_rank + qk_rope_head_dim numbers.

Also here: `MLARotaryEmbedding` (RoPE tables, YaRN frequencies) and
`cache_bytes_per_token` (this cache against a per-head K/V cache).

Not here: the decoder (decoder.py builds these from `ModelConfig.attention`),
grouped-query attention and the standard KV cache (moekit.modules), reading
DeepSeek checkpoints (moekit.hf.deepseek).

Shape suffixes: B batch, H heads, T new tokens, K keys (cache included),
D hidden, n nope dims, p rope dims, v value dims, r kv_lora_rank, l = r + p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import _check_int
from ..errors import ConfigError
from ..modules import KVCache, RMSNorm, causal_mask, check_cache_write, rotate_half

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the default eps, not rms_norm_eps


@dataclass
class MLAConfig:
    """The shape of multi-head latent attention (used when `ModelConfig.attention == "mla"`)."""

    q_lora_rank: int = 0  # 0: a full-rank q_proj (DeepSeek-V2-Lite)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_interleave: bool = True  # DeepSeek's (x0, x1), (x2, x3) ... rotary pairs; False: rotate-half
    bias: bool = False  # attention_bias: biases on q_a_proj, kv_a_proj_with_mqa and o_proj
    # YaRN (rope_type "yarn"); yarn_factor 1.0 = plain RoPE. Same meaning as the Hugging Face rope parameters.
    yarn_factor: float = 1.0
    yarn_original_max_len: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 0.0  # 0: absent
    yarn_mscale_all_dim: float = 0.0  # 0: absent (no softmax-scale correction)
    yarn_attention_factor: float = 0.0  # 0: derived from factor and the mscales
    yarn_truncate: bool = True

    def __post_init__(self) -> None:
        for name in ("q_lora_rank", "qk_nope_head_dim"):
            _check_int(self, name, 0)
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "yarn_original_max_len"):
            _check_int(self, name, 1)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim} is invalid: it must be even")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Numbers cached per token and layer: the compressed KV plus the shared RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN with mscale_all_dim (transformers' yarn_apply_mscale)."""
        scale = self.qk_head_dim**-0.5
        if self.yarn_factor != 1.0 and self.yarn_mscale_all_dim:
            m = _yarn_mscale(self.yarn_factor, self.yarn_mscale_all_dim)
            scale *= m * m
        return scale


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# ---------------------------------------------------------------- rotary tables


class MLARotaryEmbedding(nn.Module):
    """cos/sin tables over qk_rope_head_dim, with YaRN frequencies and attention factor when configured."""

    def __init__(self, mla: MLAConfig, theta: float) -> None:
        super().__init__()
        self.mla, self.theta = mla, theta
        inv_freq, self.attention_factor = yarn_frequencies(mla, theta)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self, device: torch.device | None = None) -> None:
        """Recompute the frequencies (after a meta-device build); always float32."""
        self.inv_freq = yarn_frequencies(self.mla, self.theta)[0].to(device)

    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions_BT[..., None].float() * self.inv_freq.to(device=positions_BT.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def yarn_frequencies(mla: MLAConfig, theta: float) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention factor): plain RoPE when yarn_factor is 1, else YaRN as transformers computes it."""
    dim = mla.qk_rope_head_dim
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if mla.yarn_factor == 1.0:
        return 1.0 / pos_freqs, 1.0
    factor = mla.yarn_factor
    attention = mla.yarn_attention_factor
    if not attention:
        if mla.yarn_mscale and mla.yarn_mscale_all_dim:
            attention = _yarn_mscale(factor, mla.yarn_mscale) / _yarn_mscale(factor, mla.yarn_mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(mla.yarn_original_max_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(mla.yarn_beta_fast), correction_dim(mla.yarn_beta_slow)
    if mla.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [..., T, p] by cos/sin [B, T, p] (broadcast over heads at dim 1).

    interleave: pairs (x0, x1), (x2, x3) ... rotate together, and the result is
    laid out [even parts | odd parts] (transformers' apply_rotary_pos_emb_interleave);
    queries and keys share the layout, so their dot products are DeepSeek's.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if not interleave:
        return x * cos + rotate_half(x) * sin
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---------------------------------------------------------------- latent KV cache


class LatentKVCache(KVCache):
    """One buffer per layer, [B, max_len, kv_lora_rank + qk_rope_head_dim]: the normed latent, then the rotated RoPE key.

    Same bookkeeping as `KVCache` (explicit `start`, `lengths`, `length`,
    `reset`); `update` writes one latent tensor instead of a key/value pair.
    Its rows move through the same row interface (moekit.cache_rows) over its one buffer per layer.
    """

    time_dim = 1

    def __init__(self, batch_size: int, num_layers: int, max_len: int, latent_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        self.batch_size = batch_size
        self.max_len = max_len
        self.latents = [torch.zeros(batch_size, max_len, latent_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self.latents)

    def layer_buffers(self, layer_idx: int) -> tuple[torch.Tensor]:
        return (self.latents[layer_idx],)

    def update(self, layer_idx: int, latent_BTl: torch.Tensor, start: int) -> torch.Tensor:  # type: ignore[override]
        """Write latents at [start:start+T] of layer `layer_idx`; return a view of [:start+T]."""
        batch, t, _ = latent_BTl.shape
        end = start + t
        check_cache_write(start, t, batch, self.max_len, self.batch_size)
        buf = self.latents[layer_idx]
        buf[:batch, start:end] = latent_BTl
        self.lengths[layer_idx] = end
        return buf[:batch, :end]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.latents)


def cache_bytes_per_token(num_layers: int, num_heads: int, mla: MLAConfig, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes one token occupies in the cache, all layers: MLA's latent cache vs a per-head K/V cache.

    latent: kv_lora_rank + qk_rope_head_dim numbers per layer (this module's cache);
    per_head_kv: the expanded keys (nope + rope dims) and values of every head,
    what a standard K/V cache of this attention would hold.
    """
    latent = num_layers * mla.latent_dim * dtype_bytes
    per_head = num_layers * num_heads * (mla.qk_head_dim + mla.v_head_dim) * dtype_bytes
    return {"latent": latent, "per_head_kv": per_head}


# ---------------------------------------------------------------- attention


class MLAttention(nn.Module):
    """DeepSeek multi-head latent attention; parameter names are transformers' (q_a_proj, kv_b_proj, ...)."""

    def __init__(self, hidden_size: int, num_heads: int, mla: MLAConfig) -> None:
        super().__init__()
        self.mla, self.num_heads = mla, num_heads
        self.scale = mla.softmax_scale()
        self.absorb = "decode"  # decode: absorbed form for one-token cached steps; always / never (tests, benchmarks)
        q_out = num_heads * mla.qk_head_dim
        if mla.q_lora_rank:
            self.q_a_proj = nn.Linear(hidden_size, mla.q_lora_rank, bias=mla.bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(hidden_size, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, mla.latent_dim, bias=mla.bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, num_heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.o_proj = nn.Linear(num_heads * mla.v_head_dim, hidden_size, bias=mla.bias)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: LatentKVCache | None = None, layer_idx: int = 0, cache_start: int = 0) -> torch.Tensor:
        """Attend; with a cache, new latents go to [cache_start:] and attention spans [0:cache_start+T]."""
        B, T, _ = x_BTD.shape
        m = self.mla
        q_BHTe = self._query(x_BTD)
        q_nope_BHTn, q_pe_BHTp = q_BHTe.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c_BTr, k_pe_BTp = self.kv_a_proj_with_mqa(x_BTD).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        q_pe_BHTp = apply_rope(q_pe_BHTp, cos, sin, m.rope_interleave)
        k_pe_BTp = apply_rope(k_pe_BTp[:, None], cos, sin, m.rope_interleave)[:, 0]
        latent_BKl = torch.cat([self.kv_a_layernorm(c_BTr), k_pe_BTp], dim=-1)
        if kv_cache is not None:
            latent_BKl = kv_cache.update(layer_idx, latent_BKl, cache_start)
        is_causal = attn_mask is None and kv_cache is None
        if attn_mask is None and kv_cache is not None and T > 1:
            attn_mask = causal_mask(T, cache_start + T, cache_start, device=x_BTD.device)
        absorbed = self.absorb == "always" or (self.absorb == "decode" and kv_cache is not None and T == 1)
        attend = self._absorbed if absorbed else self._expanded
        out_BHTv = attend(q_nope_BHTn, q_pe_BHTp, latent_BKl, attn_mask, is_causal)
        return self.o_proj(out_BHTv.transpose(1, 2).reshape(B, T, -1))

    def _query(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        if self.mla.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        else:
            q = self.q_proj(x_BTD)
        return q.view(B, T, self.num_heads, self.mla.qk_head_dim).transpose(1, 2)

    def _expanded(self, q_nope_BHTn, q_pe_BHTp, latent_BKl, attn_mask, is_causal) -> torch.Tensor:
        """Per-head keys and values from the latents (multi-token steps: training, prefill)."""
        m, H = self.mla, self.num_heads
        B, K, _ = latent_BKl.shape
        c_BKr, k_pe_BKp = latent_BKl.split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        kv_BHKe = self.kv_b_proj(c_BKr).view(B, K, H, m.qk_nope_head_dim + m.v_head_dim).transpose(1, 2)
        k_nope_BHKn, v_BHKv = kv_BHKe.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k_BHKe = torch.cat([k_nope_BHKn, k_pe_BKp[:, None].expand(B, H, K, m.qk_rope_head_dim)], dim=-1)
        q_BHTe = torch.cat([q_nope_BHTn, q_pe_BHTp], dim=-1)
        return F.scaled_dot_product_attention(q_BHTe, k_BHKe, v_BHKv, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=self.scale)

    def _absorbed(self, q_nope_BHTn, q_pe_BHTp, latent_BKl, attn_mask, is_causal) -> torch.Tensor:
        """Attention over the latents themselves: W_UK folded into the query, W_UV applied after.

        score = q_nope . (W_UK c) + q_pe . k_pe = (W_UK^T q_nope) . c + q_pe . k_pe, so the
        query becomes [W_UK^T q_nope | q_pe] and every head shares the key [c | k_pe] and value c.
        """
        m, H = self.mla, self.num_heads
        w_HEr = self.kv_b_proj.weight.view(H, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        w_uk_HNr, w_uv_HVr = w_HEr.split([m.qk_nope_head_dim, m.v_head_dim], dim=1)
        q_lat_BHTr = torch.einsum("bhtn,hnr->bhtr", q_nope_BHTn, w_uk_HNr)
        q_BHTl = torch.cat([q_lat_BHTr, q_pe_BHTp], dim=-1)
        return torch.einsum("bhtr,hvr->bhtv", _latent_attention(q_BHTl, latent_BKl, m.kv_lora_rank, attn_mask, is_causal,
                                                                self.scale), w_uv_HVr)


def _latent_attention(q_BHTl, latent_BKl, rank: int, attn_mask, is_causal: bool, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v with one key/value head shared by all query heads: two batched matmuls, no copies.

    (SDPA's math kernel would first repeat the shared latent for every head.)
    """
    B, H, T, l = q_BHTl.shape
    K = latent_BKl.shape[1]
    scores_BHTK = torch.matmul(q_BHTl.reshape(B, H * T, l), latent_BKl.transpose(1, 2)).view(B, H, T, K) * scale
    if is_causal:
        attn_mask = causal_mask(T, K, K - T, device=q_BHTl.device)
    if attn_mask is not None:
        scores_BHTK = scores_BHTK.masked_fill(~attn_mask, float("-inf"))
    probs_BHTK = scores_BHTK.float().softmax(-1).to(q_BHTl.dtype)
    return torch.matmul(probs_BHTK.view(B, H * T, K), latent_BKl[..., :rank]).view(B, H, T, rank)
