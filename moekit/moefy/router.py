"""Read-ME's decoupled router: a small causal transformer over token ids, one choice for all layers.

It reads only the token ids, never the host's hidden states, so a token's
experts are known before the host model runs (the serving side can batch and
cache by expert). Its embedding table starts as a copy of the host model's
embeddings, projected to the router's width; pre-norm blocks (moekit's
Attention with RoPE, SwiGLU) and a head to E expert logits follow. It has its
own KV cache (`new_cache`) so decoding routes one new token at a time. In a
left-padded batch it takes the host's padding mask and per-row positions (the
same `attention_mask_BK` / `positions_BT` DecoderLM.forward gets), so each row
routes as it would alone.

Not here: its training (tune.py), the model that uses it (readme_lm.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..modules import Attention, KVCache, RMSNorm, RotaryEmbedding, SwiGLU, causal_mask


@dataclass
class RouterConfig:
    vocab_size: int
    host_hidden: int
    num_experts: int
    top_k: int = 1
    hidden_size: int = 64
    num_layers: int = 1
    num_heads: int = 4
    max_seq_len: int = 1024

    def to_dict(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, cfg: RouterConfig):
        super().__init__()
        d = cfg.hidden_size
        self.input_layernorm = RMSNorm(d)
        self.self_attn = Attention(d, cfg.num_heads, cfg.num_heads)
        self.post_attention_layernorm = RMSNorm(d)
        self.mlp = SwiGLU(d, 2 * d)

    def forward(self, x, cos, sin, mask, kv_cache, i, cache_start):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, i, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoupledRouter(nn.Module):
    def __init__(self, cfg: RouterConfig, host_embeddings: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.host_hidden)
        if host_embeddings is not None:
            with torch.no_grad():
                self.embed_tokens.weight.copy_(host_embeddings)
        self.proj = nn.Linear(cfg.host_hidden, cfg.hidden_size, bias=False)
        self.layers = nn.ModuleList(_Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.rotary = RotaryEmbedding(cfg.hidden_size // cfg.num_heads)

    def forward(self, ids_BT: torch.Tensor, kv_cache: KVCache | None = None, cache_start: int = 0,
                attention_mask_BK: torch.Tensor | None = None, positions_BT: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, E] expert logits for tokens at cache positions cache_start .. cache_start + T.

        attention_mask_BK: 1 for real tokens, 0 for padding, over cache + new tokens; positions_BT: each
        row's rotary positions (default cache_start + t). Both as DecoderLM.forward takes them.
        """
        B, T = ids_BT.shape
        if positions_BT is None:
            positions_BT = torch.arange(cache_start, cache_start + T, device=ids_BT.device).expand(B, T)
        x = self.proj(self.embed_tokens(ids_BT))
        cos, sin = self.rotary(positions_BT, x.dtype)
        mask = None
        if attention_mask_BK is not None:
            padding = attention_mask_BK[:, : cache_start + T] == 0
            mask = causal_mask(T, cache_start + T, cache_start, padding) if bool(padding.any()) else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, kv_cache, i, cache_start)
        return self.head(self.norm(x))

    def route(self, ids_BT: torch.Tensor, kv_cache: KVCache | None = None, cache_start: int = 0,
              attention_mask_BK: torch.Tensor | None = None, positions_BT: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T, K] the experts of each token (for every layer of the host)."""
        logits = self(ids_BT, kv_cache, cache_start, attention_mask_BK, positions_BT)
        return logits.topk(self.cfg.top_k, dim=-1).indices

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        c = self.cfg
        p = self.proj.weight
        return KVCache(batch_size, c.num_layers, c.num_heads, max_len or c.max_seq_len, c.hidden_size // c.num_heads, p.dtype, p.device)
