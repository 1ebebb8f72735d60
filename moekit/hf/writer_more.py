"""Exporting to Granite-MoE, PhiMoE and GPT-OSS: does a model fit the family, and its config.json.

`fit_problems(cfg, arch)` lists why a moekit model cannot be written as one
of these families (empty: it fits); `hf_config(cfg, arch, dtype)` writes the
config.json transformers reads back to the same logits; `extra_features(cfg)`
names the features only these families have, so the first four families
(writer.py) refuse a model that uses them; `expert_count_problems(cfg)` the
per-layer expert counts a config.json with one count cannot state.

Not here: the tensor names and layouts (families_more.py), writing files (writer.py).
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.decoder import ModelConfig
from .families_more import MORE_FAMILIES

FAMILY_FEATURES = {  # feature -> the families that have it
    "o_bias": ("granitemoe", "phimoe", "gpt_oss"),
    "multipliers": ("granitemoe",),
    "score_func='topk_softmax'": ("granitemoe", "gpt_oss"),
    "norm='layer'": ("phimoe",),
    "lm_head_bias": ("phimoe",),
    "router='sparsemixer'": ("phimoe",),
    "rope_scaling longrope": ("phimoe",),
    "rope_scaling yarn": ("gpt_oss",),
    "attention_sinks": ("gpt_oss",),
    "sliding-window layers (layer_types)": ("gpt_oss",),
    "router_bias": ("gpt_oss",),
    "expert_biases / clamped_swiglu": ("gpt_oss",),
}


def extra_features(cfg: ModelConfig) -> list[str]:
    """The features of `cfg` that only Granite-MoE / PhiMoE / GPT-OSS have."""
    m = cfg.moe
    used = {
        "o_bias": cfg.o_bias,
        "multipliers": (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logits_scaling) != (1.0, 1.0, 1.0)
        or cfg.attention_multiplier != 0.0,
        "score_func='topk_softmax'": m.score_func == "topk_softmax",
        "norm='layer'": cfg.norm == "layer",
        "lm_head_bias": cfg.lm_head_bias,
        "router='sparsemixer'": m.router == "sparsemixer",
        "rope_scaling longrope": cfg.rope_scaling.get("rope_type") == "longrope",
        "rope_scaling yarn": cfg.rope_scaling.get("rope_type") == "yarn",
        "attention_sinks": cfg.attention_sinks,
        "sliding-window layers (layer_types)": "sliding_attention" in cfg.layer_types,
        "router_bias": m.router_bias,
        "expert_biases / clamped_swiglu": m.expert_biases or m.activation == "clamped_swiglu",
    }
    return [f"{name} (only {', '.join(FAMILY_FEATURES[name])})" for name, on in used.items() if on]


def expert_count_problems(cfg: ModelConfig) -> list[str]:
    """Per-layer expert counts a config.json written from `moe.num_experts` cannot state (these families, DeepSeek)."""
    counts = set(cfg.experts_per_layer)
    if len(counts) > 1:
        return ["a pyramid of expert counts per layer (experts_per_layer)"]
    if counts and counts != {cfg.moe.num_experts}:
        return [f"experts_per_layer={cfg.experts_per_layer} differs from moe.num_experts={cfg.moe.num_experts} "
                f"(this family states one expert count: accepted, moe.num_experts={cfg.experts_per_layer[0]})"]
    return []


def fit_problems(cfg: ModelConfig, arch: str) -> list[str]:
    """Why `cfg` does not fit family `arch` (one of MORE_FAMILIES); empty: it fits."""
    m = cfg.moe
    problems = [p for p in extra_features(cfg) if arch not in p.split("(only ")[1]]
    if cfg.ffn != "moe":
        problems.append(f"ffn={cfg.ffn!r} (only plain MoE layers)")
    if any(not cfg.is_moe_layer(i) for i in range(cfg.num_layers)):
        problems.append("dense layers (first_k_dense / dense_layers / moe_layer_freq); this family makes every layer MoE")
    problems += expert_count_problems(cfg)
    if m.selection_bias:
        problems.append("selection_bias=true (a fixed expert-selection bias; only deepseek_v3 has one)")
    if m.num_shared_experts:
        problems.append(f"num_shared_experts={m.num_shared_experts} (this family has no shared expert)")
    if cfg.qk_norm != "none":
        problems.append(f"qk_norm={cfg.qk_norm!r} (this family has none)")
    if cfg.qkv_bias != cfg.o_bias:
        problems.append(f"qkv_bias={cfg.qkv_bias} with o_bias={cfg.o_bias} (attention_bias sets both)")
    for name, bad in (("routed_scaling_factor", m.routed_scaling_factor != 1.0), ("n_group", m.n_group > 1),
                      ("bias_update_rate", m.bias_update_rate > 0), ("eval_capacity_factor", m.eval_capacity_factor > 0)):
        if bad:
            problems.append(f"{name}={getattr(m, name)}")
    want = {"granitemoe": ("swiglu", "topk", "topk_softmax"), "phimoe": ("swiglu", "sparsemixer", "softmax"),
            "gpt_oss": ("clamped_swiglu", "topk", "topk_softmax")}[arch]
    if m.activation != want[0]:
        problems.append(f"activation={m.activation!r} ({arch} uses {want[0]!r})")
    if m.router != want[1]:
        problems.append(f"router={m.router!r} ({arch} uses {want[1]!r})")
    if m.router != "sparsemixer" and m.score_func != want[2]:
        problems.append(f"score_func={m.score_func!r} ({arch} uses {want[2]!r})")
    if arch == "gpt_oss":
        problems += [f"{n}=false (gpt_oss always has them)" for n, on in
                     (("attention_sinks", cfg.attention_sinks), ("router_bias", m.router_bias)) if not on]
    elif cfg.head_dim not in (0, cfg.hidden_size // cfg.num_heads):
        problems.append(f"head_dim={cfg.head_dim} != hidden_size / num_heads")
    return problems


def hf_config(cfg: ModelConfig, arch: str, dtype: torch.dtype) -> dict[str, Any]:
    """The config.json of family `arch` describing `cfg` (which must fit it)."""
    fam, m = MORE_FAMILIES[arch], cfg.moe
    rope = {"rope_type": "default", **cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    data: dict[str, Any] = {
        "architectures": [fam.architecture], "model_type": fam.model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "num_local_experts": m.num_experts, "num_experts_per_tok": m.top_k, "intermediate_size": m.expert_hidden,
        "attention_bias": cfg.qkv_bias, "dtype": str(dtype).removeprefix("torch."), "use_cache": True,
        "attention_dropout": 0.0, "router_aux_loss_coef": 0.0, "output_router_logits": False,
    }
    if arch == "granitemoe":
        head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
        data.update(embedding_multiplier=cfg.embedding_multiplier, residual_multiplier=cfg.residual_multiplier,
                    attention_multiplier=cfg.attention_multiplier or head_dim**-0.5, logits_scaling=cfg.logits_scaling)
    elif arch == "phimoe":
        data.update(lm_head_bias=cfg.lm_head_bias, router_jitter_noise=m.sparsemixer_eps, input_jitter_noise=0.0,
                    sliding_window=None)
    else:
        data.update(head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads, swiglu_alpha=m.swiglu_alpha,
                    swiglu_limit=m.swiglu_limit, sliding_window=cfg.sliding_window or cfg.max_seq_len,  # unused by full layers
                    layer_types=cfg.layer_types or ["full_attention"] * cfg.num_layers)
    return data
