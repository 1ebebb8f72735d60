"""The decoder's blocks: the per-forward context, the pre-norm block and the Mixture-of-Depths block.

`ForwardCtx` is built once per `DecoderLM.forward` (DecoderLM.forward_ctx) and
read by every block: rotary tables, the padding mask, the KV cache and where
the new tokens start in it, the routers' group ids and causal mode. Blocks
record what they return besides the hidden states (each layer's Routing,
Mixture-of-Depths' losses) in it, so `Block.forward(x, ctx)` is the pre-norm
residual of nanoGPT / gpt-fast:

    x = x + attend(input_layernorm(x), ctx)
    x = x + feed_forward(post_attention_layernorm(x), ctx)

`MoDBlock` (a layer in `ModelConfig.mod_layers`) is its own class, chosen at
build time (`build_block`): only the tokens its DepthRouter chooses pass it.

Not here: the model around the blocks, its config and the KV cache's creation
(decoder.py), the attention modules (modules.py, mla.py), the MoE layers
(moe/layers.py).

Builders take a decoder.ModelConfig (not imported: decoder.py imports this module).

Shape legend: B batch, T new tokens, K keys (cache included), D hidden, N chosen tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..modules import Attention, KVCache, build_mlp, build_norm, causal_mask
from ..moe.layers import DepthRouter, MoELayer, ResidualMoE
from ..moe.routing import Routing
from .mla import MLAttention


@dataclass
class ForwardCtx:
    """What every block of one forward shares; built once per forward.

    mask: [B, 1, T, K] bool (True: may attend), or None for plain causal attention; cache: the KV
    cache (None: no cache); start: the cache position of the first new token; group_ids: flat
    `group_ids_T` for the routers (None: none); causal: the routers' causal mode (None: their default).
    Filled by the blocks: `routings` (one per layer, None for a dense FFN) and `aux` (the
    Mixture-of-Depths blocks' loss dicts).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None = None
    cache: KVCache | None = None
    start: int = 0
    group_ids: torch.Tensor | None = None
    causal: bool | None = None
    routings: list[Routing | None] = field(default_factory=list)
    aux: list[dict[str, torch.Tensor]] = field(default_factory=list)


def build_attention(cfg, layer_idx: int) -> nn.Module:
    """The attention module `cfg.attention` names, for layer `layer_idx` (sliding window or full)."""
    if cfg.attention == "mla":
        return MLAttention(cfg.hidden_size, cfg.num_heads, cfg.mla)
    return Attention(
        cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim or None,
        qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
        scale=cfg.attention_multiplier or None, sinks=cfg.attention_sinks, sliding_window=cfg.window_for_layer(layer_idx),
    )


def build_ffn(cfg, layer_idx: int) -> nn.Module:
    """Layer `layer_idx`'s FFN: a dense MLP, a Residual-MoE or an MoE, as the config says."""
    if not cfg.is_moe_layer(layer_idx):
        return build_mlp(cfg.moe.activation, cfg.hidden_size, cfg.dense_hidden)
    if cfg.ffn == "residual_moe":
        return ResidualMoE(cfg.moe_for_layer(layer_idx), cfg.dense_hidden)
    return MoELayer(cfg.moe_for_layer(layer_idx))


def build_block(cfg, layer_idx: int) -> Block:
    """A Mixture-of-Depths block for the layers in `cfg.mod_layers`, else the plain block."""
    return (MoDBlock if layer_idx in cfg.mod_layers else Block)(cfg, layer_idx)


class Block(nn.Module):
    """Pre-norm residual block: attention, then the FFN (dense MLP, MoE or Residual-MoE)."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.self_attn = build_attention(cfg, layer_idx)
        self.post_attention_layernorm = build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.residual_multiplier = cfg.residual_multiplier
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = build_ffn(cfg, layer_idx)

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardCtx) -> torch.Tensor:
        x_BTD = x_BTD + self.attend(self.input_layernorm(x_BTD), ctx)
        return x_BTD + self.feed_forward(self.post_attention_layernorm(x_BTD), ctx)

    def attend(self, h_BTD: torch.Tensor, ctx: ForwardCtx, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention branch (times residual_multiplier); `mask`, when given, replaces ctx.mask."""
        out = self.self_attn(h_BTD, ctx.cos, ctx.sin, ctx.mask if mask is None else mask, ctx.cache, self.layer_idx, ctx.start)
        return self._scaled(out)

    def feed_forward(self, h: torch.Tensor, ctx: ForwardCtx, group_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The FFN branch (times residual_multiplier); an MoE's Routing goes to ctx.routings[layer_idx].

        group_ids, when given, replace ctx.group_ids (a Mixture-of-Depths block's chosen tokens' groups).
        """
        if not self.is_moe:
            return self._scaled(self.mlp(h))
        out, routing = self.mlp(h, ctx.group_ids if group_ids is None else group_ids, ctx.causal)
        ctx.routings[self.layer_idx] = routing
        return self._scaled(out)

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        m = self.residual_multiplier
        return out * m if m != 1.0 else out


class MoDBlock(Block):
    """Mixture-of-Depths (MoMa): only the tokens the block's DepthRouter chooses are computed.

    Chosen tokens attend among the chosen (cached ones included: the layer's depth history, see
    `depth_keys`) and alone pass the FFN; each becomes x + w * (block(x) - x), with w the router's
    sigmoid score, so the score learns through the output. The others pass unchanged. The router's
    losses (predictor BCE and accuracy) go to ctx.aux.
    """

    def __init__(self, cfg, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.depth_router = DepthRouter(cfg.hidden_size, cfg.mod_capacity, cfg.mod_predictor_hidden)

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardCtx) -> torch.Tensor:
        B, T, D = x_BTD.shape
        chosen_BT, w_BT, aux = self.depth_router(x_BTD, ctx.causal)
        ctx.aux.append(aux)
        h_BTD = x_BTD + self.attend(self.input_layernorm(x_BTD), ctx, self._depth_mask(chosen_BT, ctx))
        idx_N = chosen_BT.reshape(-1).nonzero().squeeze(-1)
        h_1ND = h_BTD.reshape(-1, D)[idx_N][None]
        groups = ctx.group_ids[idx_N] if ctx.group_ids is not None and ctx.group_ids.numel() == B * T else None
        new_ND = (h_1ND + self.feed_forward(self.post_attention_layernorm(h_1ND), ctx, groups))[0]
        x_ND = x_BTD.reshape(-1, D)
        x_ND_chosen = x_ND[idx_N]
        w_N1 = w_BT.reshape(-1)[idx_N, None].to(x_BTD.dtype)
        return x_ND.index_copy(0, idx_N, x_ND_chosen + w_N1 * (new_ND - x_ND_chosen)).view(B, T, D)

    def _depth_mask(self, chosen_BT: torch.Tensor, ctx: ForwardCtx) -> torch.Tensor:
        """Causal attention over the keys this layer computed for, and the padding mask."""
        T = chosen_BT.shape[1]
        keys_BK = depth_keys(ctx.cache, self.layer_idx, chosen_BT, ctx.start)
        start = ctx.start if ctx.cache is not None else 0
        mask = causal_mask(T, start + T, start, ~keys_BK)
        return mask & ctx.mask if ctx.mask is not None else mask


def depth_keys(cache: KVCache | None, layer_idx: int, chosen_BT: torch.Tensor, start: int) -> torch.Tensor:
    """[B, K] which keys Mixture-of-Depths layer `layer_idx` computed for: the new tokens' choice, after the cached history.

    The one place a MoDBlock reads and writes its depth history: the cache's own DepthHistory
    (moekit.cache_rows), written at start .. start + T.
    """
    if cache is None:
        return chosen_BT
    return cache.update_depth(layer_idx, chosen_BT, start)
