"""Granite-MoE, PhiMoE and GPT-OSS: their config mapping and tensor names (Hugging Face -> moekit).

Each family's quirks map onto ModelConfig / MoEConfig fields:

- Granite-MoE (`granitemoe`): embedding, residual, attention and logits
  multipliers; top-k of the router logits, then a softmax over those k;
  experts stored fused in moekit's own layout (`input_linear` [E, 2F, D]).
- PhiMoE (`phimoe`): sparsemixer top-2 routing, LayerNorm with bias,
  lm_head bias, q/k/v/o biases, LongRoPE (see moekit.rope).
- GPT-OSS (`gpt_oss`): q/k/v/o biases, per-head attention sinks,
  alternating sliding-window and full layers, YaRN, a router with bias and
  a softmax over the selected top-k, experts with biases and the clamped
  SwiGLU, stored transposed with gate and up columns interleaved (`Convert`),
  or as MXFP4 blocks and scales dequantized on load (moekit.hf.mxfp4).

Anything else these checkpoints may use is refused by name. Not here: the
first four families (families.py), what an export writes (writer_more.py),
reading files (reader.py).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..config import MoEConfig
from ..models.decoder import ModelConfig
from .common import Convert, Family, need, unsupported
from .mxfp4 import dequantize_mxfp4

MORE_FAMILIES = {
    "granitemoe": Family("granitemoe", "GraniteMoeForCausalLM", "block_sparse_moe", ("input_linear", "input_linear", "output_linear"),
                         "none", False, False, "intermediate_size", "attention_bias"),
    "phimoe": Family("phimoe", "PhimoeForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), "none", False, False,
                     "intermediate_size", "attention_bias"),
    "gpt_oss": Family("gpt_oss", "GptOssForCausalLM", "mlp", ("gate_up_proj", "gate_up_proj", "down_proj"), "none", False, False,
                      "intermediate_size", "attention_bias"),
}
ROPE_KINDS = {"granitemoe": ("default",), "phimoe": ("default", "longrope"), "gpt_oss": ("default", "yarn")}


def refuse_quantized(hf: dict, where: str, fam: Family) -> None:
    """Quantized checkpoints are refused by method, except GPT-OSS's MXFP4 experts (dequantized on load)."""
    q = hf.get("quantization_config")
    if not q:
        return
    method = q.get("quant_method") if isinstance(q, dict) else q
    if fam.model_type == "gpt_oss" and method == "mxfp4":
        return
    raise unsupported(where, fam, f"quantization_config quant_method={method!r} (only gpt_oss's 'mxfp4' is dequantized on load)")


# ---------------------------------------------------------------- config: Hugging Face -> moekit


def model_config(hf: dict, where: str, fam: Family) -> ModelConfig:
    """The ModelConfig of a granitemoe / phimoe / gpt_oss config dict."""
    refuse_quantized(hf, where, fam)
    kind = fam.model_type
    if kind != "gpt_oss" and hf.get("hidden_act", "silu") != "silu":
        raise unsupported(where, fam, f"hidden_act={hf['hidden_act']!r} (only 'silu', i.e. SwiGLU experts)")
    base = _base(hf, where, fam)
    moe = dict(hidden_size=base["hidden_size"], num_experts=int(need(hf, where, fam, "num_local_experts", "num_experts")),
               top_k=int(need(hf, where, fam, "num_experts_per_tok")), expert_hidden=int(need(hf, where, fam, "intermediate_size")),
               norm_topk_prob=False)
    extra = {"granitemoe": _granite, "phimoe": _phimoe, "gpt_oss": _gpt_oss}[kind](hf, where, fam, base, moe)
    return ModelConfig(moe=MoEConfig(**moe), **base, **extra)


def _base(hf: dict, where: str, fam: Family) -> dict[str, Any]:
    num_heads = int(need(hf, where, fam, "num_attention_heads"))
    hidden = int(need(hf, where, fam, "hidden_size"))
    head_dim = int(hf.get("head_dim") or 0)
    if fam.model_type != "gpt_oss" and head_dim not in (0, hidden // num_heads):
        raise unsupported(where, fam, f"head_dim={head_dim} != hidden_size / num_attention_heads")
    bias = bool(hf.get("attention_bias", False))
    theta, scaling = _rope(hf, where, fam)
    return dict(
        vocab_size=int(need(hf, where, fam, "vocab_size")),
        num_layers=int(need(hf, where, fam, "num_hidden_layers")),
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=head_dim if fam.model_type == "gpt_oss" else 0,
        max_seq_len=int(hf.get("max_position_embeddings") or 4096),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        ffn="moe",
    )


def _rope(hf: dict, where: str, fam: Family) -> tuple[float, dict]:
    """(rope_theta, moekit's rope_scaling dict: {} for plain RoPE)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = params.pop("rope_type", params.pop("type", None)) or "default"
    theta = params.pop("rope_theta", hf.get("rope_theta"))
    theta = float(theta if theta is not None else 10000.0)
    if kind not in ROPE_KINDS[fam.model_type]:
        raise unsupported(where, fam, f"rope_type={kind!r} (accepted: {', '.join(ROPE_KINDS[fam.model_type])})")
    if kind == "default":
        return theta, {}
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise unsupported(where, fam, f"partial_rotary_factor={params['partial_rotary_factor']}")
    params["original_max_position_embeddings"] = int(need({**hf, **params}, where, fam, "original_max_position_embeddings"))
    if kind == "yarn" and params.get("factor") is None:
        params["factor"] = float(hf["max_position_embeddings"]) / params["original_max_position_embeddings"]
    if kind == "longrope":
        for key in ("short_factor", "long_factor", "short_mscale", "long_mscale"):
            need(params, where, fam, key)
    return theta, {"rope_type": kind, **params}


def _sliding_cap(hf: dict, base: dict) -> None:
    """A sliding window on every layer: within it the attention is full, so moekit's context stops there."""
    if hf.get("sliding_window"):
        base["max_seq_len"] = min(base["max_seq_len"], int(hf["sliding_window"]))


def _granite(hf, where, fam, base, moe) -> dict[str, Any]:
    moe.update(score_func="topk_softmax")
    return dict(
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        attention_multiplier=float(hf.get("attention_multiplier", 1.0)),
        logits_scaling=float(hf.get("logits_scaling", 1.0)),
    )


def _phimoe(hf, where, fam, base, moe) -> dict[str, Any]:
    if moe["top_k"] != 2:
        raise unsupported(where, fam, f"num_experts_per_tok={moe['top_k']} (sparsemixer routing always picks 2)")
    moe.update(router="sparsemixer", sparsemixer_eps=float(hf.get("router_jitter_noise", 0.01)))
    _sliding_cap(hf, base)
    scaling = base["rope_scaling"]
    if scaling and float(scaling["short_mscale"]) != float(scaling["long_mscale"]):
        warnings.warn(
            f"{where}: short_mscale != long_mscale. moekit's forward switches the mscale by the largest position as "
            f"transformers' does, but transformers' generate also recomputes the whole cache when the sequence first "
            f"passes original_max_position_embeddings={scaling['original_max_position_embeddings']}; moekit's cached "
            f"generation does not, so tokens after that point may differ", stacklevel=2)
    return dict(norm="layer", lm_head_bias=bool(hf.get("lm_head_bias", False)))


def _gpt_oss(hf, where, fam, base, moe) -> dict[str, Any]:
    L = base["num_layers"]
    layer_types = list(hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(L)])
    unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise unsupported(where, fam, f"layer_types {unknown}")
    window = int(hf.get("sliding_window") or 0)
    if not window:
        layer_types = ["full_attention"] * L
    moe.update(score_func="topk_softmax", router_bias=True, activation="clamped_swiglu", expert_biases=True,
               swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)), swiglu_limit=float(hf.get("swiglu_limit", 7.0)))
    return dict(attention_sinks=True, layer_types=layer_types, sliding_window=window)


# ---------------------------------------------------------------- weight names


def expected_names(cfg: ModelConfig, fam: Family, fused: bool, stored: set[str] | None = None) -> dict[str, tuple]:
    """Hugging Face tensor name -> (moekit parameter, index[, Convert]); target None: read as another's companion."""
    names: dict[str, tuple] = {"model.embed_tokens.weight": ("embed_tokens.weight", ())}
    norms = ["weight", "bias"] if cfg.norm == "layer" else ["weight"]
    names.update({f"model.norm.{n}": (f"norm.{n}", ()) for n in norms})
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", ())
    if cfg.lm_head_bias:
        names["lm_head.bias"] = ("lm_head.bias", ())
    attn = [f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    attn += [f"{p}.bias" for p in ("q_proj", "k_proj", "v_proj")] if cfg.qkv_bias else []
    attn += ["o_proj.bias"] if cfg.o_bias else []
    attn += ["sinks"] if cfg.attention_sinks else []
    mxfp4 = stored is not None and any(n.endswith("experts.gate_up_proj_blocks") for n in stored)
    for i in range(cfg.num_layers):
        hp, mp = f"model.layers.{i}.", f"layers.{i}."
        layer = [f"{ln}.{n}" for ln in ("input_layernorm", "post_attention_layernorm") for n in norms]
        for n in (*layer, *(f"self_attn.{a}" for a in attn)):
            names[hp + n] = (mp + n, ())
        moe_names = {"granitemoe": _granite_moe, "phimoe": _phimoe_moe, "gpt_oss": _gpt_oss_moe}[fam.model_type]
        names.update(moe_names(cfg, hp + fam.moe_module + ".", mp + "mlp.", mxfp4))
    return names


def _granite_moe(cfg, hm, mm, mxfp4):
    return {hm + "input_linear.weight": (mm + "experts.w_in_EHD", ()), hm + "output_linear.weight": (mm + "experts.w_out_EDF", ()),
            hm + "router.layer.weight": (mm + "router.gate.weight", ())}


def _phimoe_moe(cfg, hm, mm, mxfp4):
    F = cfg.moe.expert_hidden
    names = {hm + "gate.weight": (mm + "router.gate.weight", ())}
    for e in range(cfg.moe.num_experts):
        names[f"{hm}experts.{e}.w1.weight"] = (mm + "experts.w_in_EHD", (e, slice(0, F)))
        names[f"{hm}experts.{e}.w3.weight"] = (mm + "experts.w_in_EHD", (e, slice(F, 2 * F)))
        names[f"{hm}experts.{e}.w2.weight"] = (mm + "experts.w_out_EDF", (e,))
    return names


def deinterleave(t: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's [E, 2F, ...] with gate and up rows alternating -> moekit's gate rows, then up rows."""
    return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)


def interleave(t: torch.Tensor) -> torch.Tensor:
    """The inverse of `deinterleave`."""
    F = t.shape[1] // 2
    return torch.stack([t[:, :F], t[:, F:]], dim=2).reshape(t.shape)


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).contiguous()


GATE_UP = Convert(load=lambda t: deinterleave(t.transpose(1, 2)), save=lambda w: _transposed(interleave(w)))
GATE_UP_BIAS = Convert(load=deinterleave, save=interleave)
DOWN = Convert(load=_transposed, save=_transposed)


def _gpt_oss_moe(cfg, hm, mm, mxfp4):
    names = {hm + "router.weight": (mm + "router.gate.weight", ()), hm + "router.bias": (mm + "router.gate.bias", ()),
             hm + "experts.gate_up_proj_bias": (mm + "experts.b_in_EH", (), GATE_UP_BIAS),
             hm + "experts.down_proj_bias": (mm + "experts.b_out_ED", ())}
    w_in, w_out = mm + "experts.w_in_EHD", mm + "experts.w_out_EDF"
    if not mxfp4:
        names[hm + "experts.gate_up_proj"] = (w_in, (), GATE_UP)
        names[hm + "experts.down_proj"] = (w_out, (), DOWN)
        return names
    # MXFP4: [E, rows, blocks, 16] packed e2m1 pairs + [E, rows, blocks] e8m0 scales, rows = the output features.
    gu, dn = hm + "experts.gate_up_proj", hm + "experts.down_proj"
    names[gu + "_blocks"] = (w_in, (), Convert(load=lambda b, s: deinterleave(dequantize_mxfp4(b, s)), companions=(gu + "_scales",)))
    names[dn + "_blocks"] = (w_out, (), Convert(load=dequantize_mxfp4, companions=(dn + "_scales",)))
    names[gu + "_scales"] = (None, ())
    names[dn + "_scales"] = (None, ())
    return names

