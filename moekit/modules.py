"""Transformer building blocks shared by every moekit model.

Holds RMSNorm, rotary position embeddings, a preallocated KV cache, grouped-query
attention on top of `scaled_dot_product_attention`, the boolean causal/padding
mask builder, and the dense MLPs (SwiGLU, GELU). Parameter names follow Hugging
Face transformers (Llama / Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE) so their
checkpoints map onto these modules one to one, and the numerics match theirs.

Not here: the MoE layer (`moekit.moe.layers`), routers, experts, whole models
(`moekit.models.decoder`), and generation loops (`moekit.infer`).

Shape suffixes: B batch, T query length, K key length (cache included),
H query heads, Hkv key/value heads, d head_dim, D hidden size, L layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache_rows import RowCache, check_cache_write
from .errors import ConfigError

QK_NORMS = ("none", "head", "full")
NORMS = ("rms", "layer")
MLP_ACTIVATIONS = ("swiglu", "gelu")


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back like HF's LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op instead of eight; in float32 it gives the same bits as the steps below (tested).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        # The weight multiplies after the cast back, exactly as HF does, so bf16 outputs match bit for bit.
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


# ---------------------------------------------------------------- rotary embeddings


class RotaryEmbedding(nn.Module):
    """RoPE tables for given positions (HF's default rope, non-interleaved `rotate_half` layout)."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ConfigError(f"head_dim={head_dim} is invalid for rotary embeddings: it must be even")
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        """The inverse frequencies (float32, CPU); scaled variants (moekit.rope) override this."""
        # Same expression as HF's compute_default_rope_parameters, so the float32 values are identical.
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))

    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos_BTd, sin_BTd) for integer positions of any leading shape, cast to `dtype`."""
        freqs = positions_BT[..., None].float() * self.inv_freq.to(device=positions_BT.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q_BHTd: torch.Tensor, k_BHTd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys; cos/sin are [B, T, d] and broadcast over the head axis."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = (q_BHTd * cos) + (rotate_half(q_BHTd) * sin)
    k = (k_BHTd * cos) + (rotate_half(k_BHTd) * sin)
    return q, k


# ---------------------------------------------------------------- KV cache


class KVCache(RowCache):
    """Preallocated key/value buffers, one pair per layer, each [B, Hkv, max_len, d].

    `update` writes new keys/values at an explicit `start` and returns views of
    everything up to the end of that write, so the caller owns the position
    bookkeeping. `lengths[i]` is the end of the latest write to layer i (a write
    at `start` logically discards anything after it), and `length` is the number
    of positions that every layer holds: where the next forward pass starts.
    """

    def __init__(
        self,
        batch_size: int,
        num_layers: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.batch_size = batch_size
        self.max_len = max_len
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def length(self) -> int:
        return min(self.lengths)

    def update(
        self, layer_idx: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v at [start:start+T] of layer `layer_idx`; return views of [:start+T]."""
        batch, _, t, _ = k_BHTd.shape
        end = start + t
        check_cache_write(start, t, batch, self.max_len, self.batch_size)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:batch, :, start:end] = k_BHTd
        values[:batch, :, start:end] = v_BHTd
        self.lengths[layer_idx] = end
        return keys[:batch, :, :end], values[:batch, :, :end]

    def layer_buffers(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer_idx], self.values[layer_idx]


# ---------------------------------------------------------------- attention


def causal_mask(
    q_len: int,
    kv_len: int,
    start: int,
    key_padding_BK: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask [B or 1, 1, q_len, kv_len]; True means the query may attend the key.

    Query i sits at absolute position start+i and may attend key j iff j <= start+i
    and key j is not padding. `key_padding_BK` is [B, kv_len] with True (or 1) where
    the key is padding. Every query may always attend its own position, so a padding
    query (left padding) gets a finite, ignorable output instead of NaN.
    """
    if key_padding_BK is not None:
        device = key_padding_BK.device
    q_pos = torch.arange(q_len, device=device)[:, None] + start
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if key_padding_BK is not None:
        if key_padding_BK.shape[-1] != kv_len:
            raise ConfigError(f"key_padding_BK has {key_padding_BK.shape[-1]} keys but kv_len={kv_len}")
        allowed = allowed & ~key_padding_BK.bool()[:, None, None, :]
    return allowed | (k_pos == q_pos)[None, None]


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional QK-norm, RoPE and a KV cache.

    qk_norm: "none"; "head" = RMSNorm over head_dim per head before RoPE (Qwen3-MoE);
    "full" = RMSNorm over the whole q / k projection before splitting heads (OLMoE).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: str = "none",
        norm_eps: float = 1e-6,
        scale: float | None = None,
        sinks: bool = False,
        sliding_window: int = 0,
    ) -> None:
        super().__init__()
        _check_heads(hidden_size, num_heads, num_kv_heads, head_dim, qk_norm)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.qk_norm = qk_norm
        self.scale = scale if scale else self.head_dim**-0.5  # Granite-MoE: attention_multiplier
        self.sliding_window = sliding_window  # > 0: a query sees only the last `sliding_window` keys (itself included)
        # GPT-OSS: one learned logit per head joins each softmax (and takes its share of the probability).
        self.sinks = nn.Parameter(torch.zeros(num_heads)) if sinks else None
        q_dim, kv_dim = num_heads * self.head_dim, num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, q_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, kv_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(q_dim, hidden_size, bias=o_bias)
        if qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, norm_eps)
            self.k_norm = RMSNorm(self.head_dim, norm_eps)
        elif qk_norm == "full":
            self.q_norm = RMSNorm(q_dim, norm_eps)
            self.k_norm = RMSNorm(kv_dim, norm_eps)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        cache_start: int = 0,
    ) -> torch.Tensor:
        """Attend; with a cache, new k/v go to [cache_start:] and attention spans [0:cache_start+T]."""
        batch, t, _ = x_BTD.shape
        q, k, v = self._project(x_BTD)
        q, k = apply_rotary(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer_idx, k, v, cache_start)
        start = cache_start if kv_cache is not None else 0
        is_causal = False
        if self.sliding_window and start + t > self.sliding_window:
            attn_mask = window_mask(attn_mask, t, start, self.sliding_window, x_BTD.device)
        if attn_mask is None and kv_cache is None:
            is_causal = True
        elif attn_mask is None and t > 1:
            # A multi-token write into a cache: SDPA's is_causal aligns top-left, so spell the mask out.
            attn_mask = causal_mask(t, cache_start + t, cache_start, device=x_BTD.device)
        if self.sinks is not None:
            if attn_mask is None and t > 1:
                attn_mask = causal_mask(t, start + t, start, device=x_BTD.device)
            out = sink_attention(q, k, v, attn_mask, self.scale, self.sinks)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, t, -1))

    def _project(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B,H,T,d], k and v [B,Hkv,T,d], with QK-norm applied where the family applies it."""
        batch, t, _ = x_BTD.shape
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, t, self.num_heads, self.head_dim)
        k = k.view(batch, t, self.num_kv_heads, self.head_dim)
        v = v.view(batch, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def window_mask(attn_mask, q_len: int, start: int, window: int, device) -> torch.Tensor:
    """The causal (and padding) mask restricted to a sliding window: key j is seen from query i iff i - window < j <= i.

    Positions are cache slots, as transformers counts them (left padding included).
    """
    kv_len = start + q_len
    base = attn_mask if attn_mask is not None else causal_mask(q_len, kv_len, start, device=device)
    q_pos = torch.arange(q_len, device=device)[:, None] + start
    k_pos = torch.arange(kv_len, device=device)[None, :]
    return base & (k_pos > q_pos - window)[None, None]


def sink_attention(q_BHTd, k_BHKd, v_BHKd, attn_mask, scale: float, sinks_H: torch.Tensor) -> torch.Tensor:
    """Attention whose softmax also holds one learned logit per head (GPT-OSS sinks), that sink then dropped.

    Computed eagerly as transformers' GPT-OSS does: logits, mask, sink column, max-shifted softmax.
    """
    B, H, T, d = q_BHTd.shape
    Hkv = k_BHKd.shape[1]
    q = q_BHTd.reshape(B, Hkv, (H // Hkv) * T, d)  # query heads of one kv group side by side: no k/v copies
    logits = (q @ k_BHKd.transpose(-1, -2)).view(B, H, T, -1) * scale
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf"))
    sink = sinks_H.to(logits.dtype).view(1, H, 1, 1).expand(B, H, T, 1)
    combined = torch.cat([logits, sink], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = combined.softmax(-1)[..., :-1].to(v_BHKd.dtype)
    return (probs.reshape(B, Hkv, (H // Hkv) * T, -1) @ v_BHKd).view(B, H, T, d)


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """"rms": RMSNorm; "layer": LayerNorm with weight and bias (PhiMoE)."""
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    raise ConfigError(f"norm={kind!r} is unknown: accepted values are {', '.join(NORMS)}")


def _check_heads(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int | None, qk_norm: str) -> None:
    if qk_norm not in QK_NORMS:
        raise ConfigError(f"qk_norm={qk_norm!r} is unknown: accepted values are {', '.join(QK_NORMS)}")
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ConfigError(
            f"num_kv_heads={num_kv_heads} is invalid: it must be >= 1 and divide num_heads={num_heads}"
        )
    if head_dim is None and hidden_size % num_heads:
        raise ConfigError(
            f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}: set head_dim explicitly"
        )


# ---------------------------------------------------------------- dense MLPs


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), HF's LlamaMLP / Qwen2-MoE shared expert."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """down(gelu(up(x))) with the exact (erf) GELU, not the tanh approximation."""

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


def build_mlp(activation: str, dim: int, hidden: int) -> nn.Module:
    """The dense MLP for an activation name: "swiglu" or "gelu"."""
    if activation == "swiglu":
        return SwiGLU(dim, hidden)
    if activation == "gelu":
        return GeluMLP(dim, hidden)
    raise ConfigError(f"activation={activation!r} is unknown: accepted values are {', '.join(MLP_ACTIVATIONS)}")
