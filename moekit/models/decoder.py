"""DecoderLM: the decoder-only language model every moekit LM feature uses.

Token embedding, pre-norm blocks (RMSNorm -> attention -> RMSNorm -> FFN) and
an output head. The FFN of each layer is chosen by the config: a dense MLP,
an MoE (with or without shared experts), or a Residual-MoE; PR-MoE pyramids
set the expert count per layer, and the first k layers (or any listed ones)
may stay dense. One class covers the Hugging Face families moekit loads
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 with multi-head latent
attention from mla.py, Granite-MoE, PhiMoE, GPT-OSS: their multipliers,
LayerNorm, biases, attention sinks, sliding-window layers and scaled RoPE are
ModelConfig fields); module names follow theirs
(`embed_tokens`, `layers.i.self_attn`, `mlp`, `lm_head`) so weights map 1:1.

One forward serves training and generation: it builds a per-forward context
(blocks.ForwardCtx: rotary tables, padding mask, cache, group ids) once and
runs every block as `x = block(x, ctx)`; Mixture-of-Depths layers are
blocks.MoDBlock.

Not here: the blocks (blocks.py), training (train/), generation loops (infer/), HF conversion (hf/).

Shape legend: B batch, T new tokens, K keys (cache included), D hidden, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import MoEConfig, _check_choice, _check_int
from ..errors import ConfigError
from ..moe.layers import MoELayer, ResidualMoE, pyramid_schedule
from ..modules import NORMS, KVCache, build_norm, causal_mask
from ..rope import build_rotary
from ..moe.routing import Routing
from .blocks import Block, ForwardCtx, MoDBlock, build_attention, build_block  # noqa: F401 (Block, MoDBlock, build_attention: re-exported)
from .mla import LatentKVCache, MLAConfig, MLARotaryEmbedding

FFN_KINDS = ("dense", "moe", "residual_moe")
ATTENTION_KINDS = ("gqa", "mla")  # grouped-query (modules.Attention) | multi-head latent (models/mla.py, DeepSeek)
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelConfig:
    """A DecoderLM's shape. `moe.hidden_size` always follows `hidden_size`."""

    vocab_size: int = 257
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0  # 0: hidden_size // num_heads
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: str = "none"  # none | head (Qwen3-MoE) | full (OLMoE)
    tie_embeddings: bool = False
    ffn: str = "moe"  # dense | moe | residual_moe
    dense_hidden: int = 1024  # width of dense MLPs (dense layers, Residual-MoE's MLP)
    first_k_dense: int = 0  # the first k layers use a dense MLP
    dense_layers: list[int] = field(default_factory=list)  # further dense layers by index
    moe_layer_freq: int = 1  # every n-th layer is MoE (Qwen2-MoE's decoder_sparse_step)
    experts_per_layer: list[int] = field(default_factory=list)  # PR-MoE pyramid; empty: moe.num_experts
    # PR-MoE by stages: expert counts per stage (e.g. [32, 64]) and layers per stage (e.g. [10, 2]; empty: an even
    # split, later stages taking the remainder). When set, experts_per_layer is derived from them (pyramid_schedule).
    pyramid: list[int] = field(default_factory=list)
    pyramid_layers: list[int] = field(default_factory=list)
    pregated: bool = False  # MoE layer i+1 routes on layer i's input (models/pregated.py; applied by build_model)
    # --- shared by GPT-OSS / Granite-MoE / PhiMoE
    o_bias: bool = False  # a bias on the attention output projection
    rope_scaling: dict = field(default_factory=dict)  # {} = plain RoPE; else moekit.rope (yarn | longrope)
    # --- Granite-MoE
    embedding_multiplier: float = 1.0  # token embeddings are multiplied by this
    residual_multiplier: float = 1.0  # each block's attention and FFN outputs are multiplied by this
    attention_multiplier: float = 0.0  # the attention softmax scale; 0: head_dim ** -0.5
    logits_scaling: float = 1.0  # logits are divided by this
    # --- PhiMoE
    norm: str = "rms"  # rms | layer (LayerNorm with bias)
    lm_head_bias: bool = False
    # --- GPT-OSS
    attention_sinks: bool = False  # one learned logit per head in every attention softmax
    layer_types: list[str] = field(default_factory=list)  # per layer: full_attention | sliding_attention; empty: all full
    sliding_window: int = 0  # the window of sliding_attention layers
    moe: MoEConfig = field(default_factory=MoEConfig)
    # --- DeepSeek (MLA): attention="mla" uses `mla` (models/mla.py); num_kv_heads / head_dim / qk_norm are then unused
    attention: str = "gqa"  # gqa | mla
    mla: MLAConfig = field(default_factory=MLAConfig)
    # --- group ids (MoMa modalities, JiuZhang tasks): [[lo, hi, group], ...] gives tokens lo <= id < hi that group
    # whenever forward gets no group_ids_BT (training, evaluation, generated tokens); ids in no range get group 0
    group_of_token: list[list[int]] = field(default_factory=list)
    # --- Mixture-of-Depths (with MoMa): these layers compute only for mod_capacity of each sequence's tokens
    mod_layers: list[int] = field(default_factory=list)
    mod_capacity: float = 0.25
    mod_predictor_hidden: int = 64  # the causal predictor that makes the choice at inference

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "max_seq_len", "dense_hidden"):
            _check_int(self, name, 1)
        for name in ("head_dim", "first_k_dense"):
            _check_int(self, name, 0)
        _check_int(self, "moe_layer_freq", 1)
        _check_choice(self, "ffn", FFN_KINDS)
        _check_choice(self, "attention", ATTENTION_KINDS)
        _check_choice(self, "norm", NORMS)
        _check_int(self, "sliding_window", 0)
        if self.layer_types and (len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES)):
            raise ConfigError(f"layer_types={self.layer_types} is invalid: it needs one of {', '.join(LAYER_TYPES)} per layer "
                              f"(num_layers={self.num_layers})")
        if "sliding_attention" in self.layer_types and self.sliding_window < 1:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window is 0: set the window")
        if self.pyramid:
            self.experts_per_layer = _pyramid(self)
        if self.experts_per_layer and len(self.experts_per_layer) != self.num_layers:
            raise ConfigError(
                f"experts_per_layer has {len(self.experts_per_layer)} entries but num_layers={self.num_layers}"
            )
        if self.moe.hidden_size != self.hidden_size:
            self.moe = replace(self.moe, hidden_size=self.hidden_size)
        _check_group_ranges(self)
        if any(not isinstance(i, int) or not 0 <= i < self.num_layers for i in self.mod_layers):
            raise ConfigError(f"mod_layers={self.mod_layers} is invalid: layer indices in [0, num_layers={self.num_layers})")
        if not 0 < self.mod_capacity <= 1:
            raise ConfigError(f"mod_capacity={self.mod_capacity} is invalid: it must be in (0, 1]")
        _check_int(self, "mod_predictor_hidden", 1)
        if self.ffn != "dense":
            _check_causal_router(self.moe)


    def is_moe_layer(self, i: int) -> bool:
        return (
            self.ffn != "dense"
            and i >= self.first_k_dense
            and i not in self.dense_layers
            and (i + 1) % self.moe_layer_freq == 0
        )

    def window_for_layer(self, i: int) -> int:
        """The sliding window of layer i (0: full attention)."""
        return self.sliding_window if self.layer_types and self.layer_types[i] == "sliding_attention" else 0

    def moe_for_layer(self, i: int) -> MoEConfig:
        if not self.experts_per_layer:
            return self.moe
        E = self.experts_per_layer[i]
        return replace(self.moe, num_experts=E, top_k=min(self.moe.top_k, E))

    @property
    def routes_by_group(self) -> bool:
        """True when the MoE layers' routers need a group id per token (group router, grouped expert choice)."""
        return self.ffn != "dense" and self.moe.num_groups > 1 and self.moe.router in ("group", "expert_choice", "task")

def _pyramid(cfg: ModelConfig) -> list[int]:
    """experts_per_layer of a PR-MoE given by stages (model.pyramid, model.pyramid_layers)."""
    try:
        return pyramid_schedule(cfg.num_layers, cfg.pyramid, cfg.pyramid_layers or None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.pyramid={cfg.pyramid} with pyramid_layers={cfg.pyramid_layers} is invalid: {e}") from None


def _check_causal_router(moe: MoEConfig) -> None:
    """Refuse routers a causal language model cannot use, naming why and what works."""
    if moe.router == "expert_choice" and moe.aux_router_hidden < 1:
        raise ConfigError(
            "moe.router='expert_choice' is refused in a causal language model without auxiliary routers: each "
            "expert picks its tokens from the whole batch, so a token's output would depend on later tokens and "
            "on other sequences, and generation could not route as training does. Set moe.aux_router_hidden "
            "(e.g. 64: causal auxiliary routers, MoMa) or use moe.router='topk'"
        )


def _check_group_ranges(cfg: ModelConfig) -> None:
    for entry in cfg.group_of_token:
        ok = (isinstance(entry, (list, tuple)) and len(entry) == 3
              and all(isinstance(v, int) and not isinstance(v, bool) for v in entry))
        G = cfg.moe.num_groups  # with one group the ranges only label tokens (per-modality losses)
        if not ok or not (0 <= entry[0] < entry[1] <= cfg.vocab_size and 0 <= entry[2] and (G == 1 or entry[2] < G)):
            raise ConfigError(
                f"group_of_token entry {entry!r} is invalid: each entry is [lo, hi, group] with "
                f"0 <= lo < hi <= vocab_size={cfg.vocab_size} and 0 <= group < moe.num_groups={G}"
            )


def token_groups(cfg: ModelConfig, ids: torch.Tensor) -> torch.Tensor | None:
    """The group of each token id by `cfg.group_of_token` (None when the config has no ranges)."""
    if not cfg.group_of_token:
        return None
    groups = torch.zeros_like(ids)
    for lo, hi, g in cfg.group_of_token:
        groups = groups.masked_fill((ids >= lo) & (ids < hi), g)
    return groups


def check_group_ids(cfg: ModelConfig, group_ids_BT: torch.Tensor, shape: tuple[int, ...]) -> None:
    """One clear message for group ids of the wrong shape, type or range.

    With moe.num_groups == 1 the ids are the routers' own business and pass unchecked (Read-ME's fixed
    routers take K expert ids per token this way, moefy/readme_lm.py).
    """
    G = cfg.moe.num_groups
    if G == 1 and group_ids_BT.shape[:2] == tuple(shape) and not group_ids_BT.dtype.is_floating_point:
        return
    if tuple(group_ids_BT.shape) != tuple(shape):
        raise ConfigError(f"group_ids has shape {tuple(group_ids_BT.shape)} but the input ids have shape {tuple(shape)}: "
                          f"give one group id per token")
    if group_ids_BT.dtype.is_floating_point or group_ids_BT.dtype == torch.bool:
        raise ConfigError(f"group_ids must be integers, got {group_ids_BT.dtype}")
    if group_ids_BT.numel() and (int(group_ids_BT.min()) < 0 or int(group_ids_BT.max()) >= G):
        raise ConfigError(f"group ids must be in [0, {G}) (moe.num_groups={G}); got values in "
                          f"[{int(group_ids_BT.min())}, {int(group_ids_BT.max())}]")


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # [B, T, V]
    aux_losses: dict[str, torch.Tensor]  # each averaged over the MoE layers
    routings: list[Routing | None]  # one per layer; None for dense layers


def build_lm_rotary(cfg: ModelConfig) -> nn.Module:
    """The RoPE tables of `cfg.attention`: over the head (gqa, scaled as rope_scaling says) or MLA's (YaRN over qk_rope_head_dim)."""
    if cfg.attention == "mla":
        return MLARotaryEmbedding(cfg.mla, cfg.rope_theta)
    return build_rotary(cfg.head_dim or cfg.hidden_size // cfg.num_heads, cfg.rope_theta, cfg.rope_scaling)


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(build_block(cfg, i) for i in range(cfg.num_layers))
        self.norm = build_norm(cfg.norm, cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = build_lm_rotary(cfg)
        self.apply(_init_weights)

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        attention_mask_BK: torch.Tensor | None = None,
        positions_BT: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_start: int = 0,
        group_ids_BT: torch.Tensor | None = None,
        last_only: bool = False,
        causal_routing: bool | None = None,
    ) -> DecoderOutput:
        """attention_mask_BK: 1 for real tokens, 0 for padding, over cache + new tokens.

        group_ids_BT: a group (modality, task) per token, in [0, moe.num_groups); without them the
        groups come from `cfg.group_of_token` (token-id ranges), if set. Every MoE layer's router
        gets them flattened as `group_ids_T` (None when there are none).
        causal_routing: expert choice's auxiliary routers and mixture-of-depths' predictors decide
        (True) or the non-causal top-k choice does (False); None: causal unless training.

        With a KV cache this is also the generation step (prefill: cache_start=0;
        decode: one new token per sequence at cache_start). last_only=True computes
        the logits of the last position alone ([B, 1, V]), all that sampling needs.
        """
        T = input_ids_BT.shape[1]
        if cache_start + T > self.cfg.max_seq_len:
            raise ConfigError(f"sequence of {cache_start + T} tokens is longer than the model's context max_seq_len={self.cfg.max_seq_len}")
        x = self.embed_tokens(input_ids_BT)
        if self.cfg.embedding_multiplier != 1.0:
            x = x * self.cfg.embedding_multiplier
        ctx = self.forward_ctx(input_ids_BT, x.dtype, attention_mask_BK, positions_BT, kv_cache, cache_start,
                               group_ids_BT, causal_routing)
        for layer in self.layers:
            x = layer(x, ctx)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        if self.cfg.logits_scaling != 1.0:
            logits = logits / self.cfg.logits_scaling
        return DecoderOutput(logits, {**_mean_aux(ctx.routings), **_mean_dicts(ctx.aux)}, ctx.routings)

    def forward_ctx(self, ids_BT: torch.Tensor, dtype: torch.dtype, attention_mask_BK: torch.Tensor | None = None,
                    positions_BT: torch.Tensor | None = None, kv_cache: KVCache | None = None, cache_start: int = 0,
                    group_ids_BT: torch.Tensor | None = None, causal: bool | None = None) -> ForwardCtx:
        """What every block of this forward reads (blocks.ForwardCtx): rotary tables, padding mask, cache, group ids."""
        B, T = ids_BT.shape
        if positions_BT is None:
            positions_BT = torch.arange(cache_start, cache_start + T, device=ids_BT.device).expand(B, T)
        cos, sin = self.rotary(positions_BT, dtype)
        mask = None
        if attention_mask_BK is not None:
            padding = attention_mask_BK[:, : cache_start + T] == 0
            mask = causal_mask(T, cache_start + T, cache_start, padding) if bool(padding.any()) else None
        return ForwardCtx(cos, sin, mask, kv_cache, cache_start, self._group_ids(ids_BT, group_ids_BT), causal,
                          routings=[None] * len(self.layers))

    def _group_ids(self, ids_BT: torch.Tensor, group_ids_BT: torch.Tensor | None) -> torch.Tensor | None:
        """Flat group ids `group_ids_T` for the routers: given, else from the token ranges, else None."""
        if group_ids_BT is None:
            group_ids_BT = token_groups(self.cfg, ids_BT)
            if group_ids_BT is None:
                if self.cfg.routes_by_group:
                    raise ConfigError(
                        f"this model routes by group (moe.router={self.cfg.moe.router!r}, moe.num_groups="
                        f"{self.cfg.moe.num_groups}) but got no group ids: pass group_ids_BT (one per token) or set "
                        f"model.group_of_token (token-id ranges per group)")
                return None
        else:
            group_ids_BT = torch.as_tensor(group_ids_BT, device=ids_BT.device)
            check_group_ids(self.cfg, group_ids_BT, ids_BT.shape)
        return group_ids_BT.reshape(-1)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype=None, device=None) -> KVCache:
        cfg = self.cfg
        p = self.embed_tokens.weight
        if cfg.attention == "mla":  # the latent cache: kv_lora_rank + qk_rope_head_dim numbers per token and layer
            cache = LatentKVCache(batch_size, cfg.num_layers, max_len or cfg.max_seq_len, cfg.mla.latent_dim,
                                  dtype or p.dtype, device or p.device)
        else:
            cache = KVCache(
                batch_size, cfg.num_layers, cfg.num_kv_heads, max_len or cfg.max_seq_len,
                cfg.head_dim or cfg.hidden_size // cfg.num_heads, dtype or p.dtype, device or p.device,
            )
        cache.contiguous_rows = any(cfg.window_for_layer(i) for i in range(cfg.num_layers))  # windows count columns
        return cache  # (mixture-of-depths choices live in the cache's own DepthHistory: moekit.cache_rows)


def _mean_aux(routings: list[Routing | None]) -> dict[str, torch.Tensor]:
    return _mean_dicts([r.aux_losses for r in routings if r is not None])


def _mean_dicts(dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    totals: dict[str, list[torch.Tensor]] = {}
    for d in dicts:
        for name, value in d.items():
            totals.setdefault(name, []).append(value)
    return {name: torch.stack(vals).mean() for name, vals in totals.items()}


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif hasattr(module, "w_in_EHD"):
        nn.init.normal_(module.w_in_EHD, std=0.02)
        nn.init.normal_(module.w_out_EDF, std=0.02)
        for b in (getattr(module, "b_in_EH", None), getattr(module, "b_out_ED", None)):
            if b is not None:
                nn.init.zeros_(b)


def count_parameters(model: DecoderLM) -> dict[str, int]:
    """Total parameters, and those active for one token (top-k of each MoE's experts)."""
    # Quantized weights are buffers (moekit.quantize); they count as the weights they stand for.
    total = sum(p.numel() for p in model.parameters()) + sum(
        m.num_weights for m in model.modules() if getattr(m, "quantized_weights", False))
    active = total
    for layer in model.layers:
        moe = layer.mlp.moe if isinstance(layer.mlp, ResidualMoE) else layer.mlp
        if isinstance(moe, MoELayer):
            E = moe.cfg.num_experts
            per_expert = moe.experts.num_weights // E
            active -= (E - experts_per_token(moe.cfg)) * per_expert
    return {"total": total, "active": active}


def experts_per_token(moe: MoEConfig) -> int:
    """How many of a MoE layer's experts one token uses: top_k, or with expert choice capacity_factor on average."""
    if moe.router == "expert_choice":
        return min(moe.num_experts, max(1, round(moe.capacity_factor)))
    return moe.top_k


def lm_loss(out: DecoderOutput, targets_BT: torch.Tensor, balance_weight: float, z_weight: float):
    """Cross-entropy plus the weighted router losses; returns (loss, parts)."""
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets_BT.flatten(), ignore_index=-100)
    loss = ce
    parts = {"ce": ce}
    if "balance" in out.aux_losses:
        parts["balance"] = out.aux_losses["balance"]
        loss = loss + balance_weight * parts["balance"]
    if "z" in out.aux_losses:
        parts["z"] = out.aux_losses["z"]
        loss = loss + z_weight * parts["z"]
    for name in ("aux_router", "mod_predictor"):  # causal predictors on detached inputs: they train only themselves
        if name in out.aux_losses:
            parts[name] = out.aux_losses[name]
            loss = loss + parts[name]
    for name in ("aux_router_accuracy", "mod_predictor_accuracy"):  # reported, not optimised
        if name in out.aux_losses:
            parts[name] = out.aux_losses[name]
    return loss, parts
