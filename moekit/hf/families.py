"""The Hugging Face MoE families moekit reads and writes: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 (+ families_more.py).

Each family is only a table (`Family`) of names and config keys plus a few
quirks; the MoE math is the foundation's (TopKRouter, Experts, shared expert
with sigmoid gate). Here: the tables (`FAMILIES`), `model_config_from_hf`
(a config.json dict -> `ModelConfig` / `MoEConfig`, refusing what moekit
cannot compute the same way) and `expected_names` (Hugging Face tensor name
-> moekit parameter slot).

Granite-MoE, PhiMoE and GPT-OSS have their own mapping in families_more.py;
this module lists them in `FAMILIES` and hands their configs and names over.

Not here: reading files and tensors (reader.py), writing a model in a family's
layout and checking that it fits one (writer.py, writer_more.py), tokenizers and chat templates
(reader.py, moekit.infer.chat); the DeepSeek specifics (deepseek.py, registered in HOOKS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import MoEConfig
from ..models.decoder import ModelConfig
from . import families_more as more
from .common import CONFIG_FILE, Family, UnsupportedModelError, need as _need, unsupported as _unsupported

FAMILIES = {
    "mixtral": Family("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), "none", False, False,
                      "intermediate_size", None),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "none", True, True,
                        "moe_intermediate_size", "qkv_bias"),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "head", False, True,
                        "moe_intermediate_size", "attention_bias"),
    "olmoe": Family("olmoe", "OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "full", False, False,
                    "intermediate_size", "attention_bias"),
    # --- DeepSeek (MLA): config, names and export come from deepseek.py's hooks (HOOKS below)
    "deepseek_v2": Family("deepseek_v2", "DeepseekV2ForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "none",
                          False, False, "moe_intermediate_size", "attention_bias"),
    "deepseek_v3": Family("deepseek_v3", "DeepseekV3ForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "none",
                          False, False, "moe_intermediate_size", "attention_bias"),
    **more.MORE_FAMILIES,  # granitemoe, phimoe, gpt_oss (families_more.py)
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclass(frozen=True)
class FamilyHooks:
    """A family the table cannot describe (e.g. DeepSeek's MLA): its own config mapping, names and export checks."""

    model_config: Callable[[dict, str, Family], Any]  # (config.json dict, where, family) -> ModelConfig
    expected_names: Callable[[Any, Family, bool], dict]  # (ModelConfig, family, fused) -> names, as expected_names
    fit_problems: Callable[[Any, Family], list]  # (ModelConfig, family) -> problems beyond the generic ones
    hf_config: Callable[[Any, Family], dict]  # (ModelConfig, family) -> the family's own config.json keys


# model_type -> hooks; filled by the modules that own those families (deepseek.py), imported by moekit.hf.
HOOKS: dict[str, FamilyHooks] = {}


def family_of(hf: dict, where: str = CONFIG_FILE) -> Family:
    """The family a config.json dict names by its model_type (an UnsupportedModelError for any other)."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{where}: model_type={model_type!r} is not supported; supported model types are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


# ---------------------------------------------------------------- config: Hugging Face -> moekit


def _refuse_quirks(hf: dict, where: str, fam: Family) -> None:
    """Features of some checkpoints that moekit does not compute: refused before anything else is read."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported(where, fam, f"hidden_act={act!r} (only 'silu', i.e. SwiGLU experts)")
    if hf.get("clip_qkv") is not None:
        raise _unsupported(where, fam, f"clip_qkv={hf['clip_qkv']}")


def _attention(hf: dict, where: str, fam: Family) -> dict[str, Any]:
    """The attention fields of ModelConfig (heads, head_dim, biases, q/k norm, rotary, context)."""
    qkv_bias = bool(hf.get(fam.bias_key, fam.model_type == "qwen2_moe")) if fam.bias_key else False
    if fam.bias_key == "attention_bias" and qkv_bias:
        raise _unsupported(where, fam, "attention_bias=true (a bias on o_proj)")
    num_heads = int(_need(hf, where, fam, "num_attention_heads"))
    hidden = int(_need(hf, where, fam, "hidden_size"))
    head_dim = hf.get("head_dim") or 0
    if fam.qk_norm == "full" and head_dim not in (0, hidden // num_heads):
        raise _unsupported(where, fam, f"head_dim={head_dim} != hidden_size / num_attention_heads")
    max_len = int(hf.get("max_position_embeddings") or 4096)
    window = _sliding_window(hf, fam)
    if window is not None:
        # Within its window sliding attention equals full attention; beyond it moekit would differ, so stop there.
        max_len = min(max_len, window)
    return dict(
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        max_seq_len=max_len,
        rope_theta=_rope_theta(hf, where, fam),
        qkv_bias=qkv_bias,
        qk_norm=fam.qk_norm,
    )


def _moe(hf: dict, where: str, fam: Family, hidden: int) -> MoEConfig:
    """The MoEConfig: expert count and width, top-k, renormalisation, shared expert."""
    return MoEConfig(
        hidden_size=hidden,
        num_experts=int(_need(hf, where, fam, "num_experts", "num_local_experts")),
        top_k=int(_need(hf, where, fam, "num_experts_per_tok")),
        expert_hidden=int(_need(hf, where, fam, fam.expert_width_key)),
        norm_topk_prob=True if fam.model_type == "mixtral" else bool(hf.get("norm_topk_prob", False)),
        num_shared_experts=1 if fam.shared_expert else 0,
        shared_expert_hidden=int(_need(hf, where, fam, "shared_expert_intermediate_size")) if fam.shared_expert else 0,
        shared_expert_gate=fam.shared_expert,
    )


def _dense_layers(hf: dict, fam: Family) -> tuple[list[int], int]:
    """(dense layer indices, MoE layer frequency): only the Qwen families have dense layers."""
    if not fam.dense_layers:
        return [], 1
    return [int(i) for i in (hf.get("mlp_only_layers") or [])], int(hf.get("decoder_sparse_step") or 1)


def model_config_from_hf(hf: dict, where: str = CONFIG_FILE) -> ModelConfig:
    """The ModelConfig (and MoEConfig) of a supported Hugging Face config dict."""
    fam = family_of(hf, where)
    if fam.model_type in HOOKS:
        return HOOKS[fam.model_type].model_config(hf, where, fam)
    if fam.model_type in more.MORE_FAMILIES:
        return more.model_config(hf, where, fam)
    more.refuse_quantized(hf, where, fam)
    _refuse_quirks(hf, where, fam)
    attn = _attention(hf, where, fam)
    moe = _moe(hf, where, fam, attn["hidden_size"])
    dense_layers, freq = _dense_layers(hf, fam)
    return ModelConfig(
        vocab_size=int(_need(hf, where, fam, "vocab_size")),
        num_layers=int(_need(hf, where, fam, "num_hidden_layers")),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        ffn="moe",
        dense_hidden=int(hf.get("intermediate_size") or moe.expert_hidden),
        dense_layers=dense_layers,
        moe_layer_freq=freq,
        moe=moe,
        **attn,
    )


def _rope_theta(hf: dict, where: str, fam: Family) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise UnsupportedModelError(f"{where}: rope_type={kind!r} is not supported by moekit's {fam.model_type} loader (only 'default')")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def _sliding_window(hf: dict, fam: Family) -> int | None:
    window = hf.get("sliding_window")
    if not window:
        return None
    if fam.model_type in ("qwen2_moe", "qwen3_moe") and not hf.get("use_sliding_window", False):
        return None
    return int(window)


# ---------------------------------------------------------------- weight names


def expected_names(cfg: ModelConfig, fam: Family, fused: bool, stored: set[str] | None = None) -> dict[str, tuple]:
    """Hugging Face tensor name -> (moekit parameter name, index into that parameter; () = all of it).

    fused=False: one tensor per expert and projection (what save_pretrained writes);
    fused=True: transformers' in-memory layout, experts.gate_up_proj [E, 2F, D] and experts.down_proj [E, D, F].
    Families of families_more.py may add a third entry, a `Convert` (stored layout <-> moekit's).
    """
    if fam.model_type in HOOKS:
        return HOOKS[fam.model_type].expected_names(cfg, fam, fused)
    if fam.model_type in more.MORE_FAMILIES:
        return more.expected_names(cfg, fam, fused, stored)
    attn = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
    if cfg.qkv_bias:
        attn += ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
    if cfg.qk_norm != "none":
        attn += ["q_norm.weight", "k_norm.weight"]
    return decoder_names(cfg, fam, attn, fused)


def decoder_names(cfg: ModelConfig, fam: Family, attn: list[str], fused: bool,
                  moe_extra: Callable[[int], dict[str, tuple[str, tuple]]] | None = None) -> dict[str, tuple[str, tuple]]:
    """The names of a decoder laid out as Mixtral/Qwen: embeddings, final norm, lm_head (untied), then per layer
    its two norms, `self_attn.<a>` for each a in `attn`, and a dense MLP or the MoE layer's names
    (followed by `moe_extra(i)`, a family's own extra tensors of MoE layer i)."""
    names: dict[str, tuple[str, tuple]] = {"model.embed_tokens.weight": ("embed_tokens.weight", ()), "model.norm.weight": ("norm.weight", ())}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", ())
    for i in range(cfg.num_layers):
        hp, mp = f"model.layers.{i}.", f"layers.{i}."
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight", *(f"self_attn.{a}" for a in attn)):
            names[hp + n] = (mp + n, ())
        if not cfg.is_moe_layer(i):
            for p in ("gate_proj", "up_proj", "down_proj"):
                names[f"{hp}mlp.{p}.weight"] = (f"{mp}mlp.{p}.weight", ())
            continue
        names.update(_moe_names(cfg, fam, i, fused))
        if moe_extra is not None:
            names.update(moe_extra(i))
    return names


def _moe_names(cfg: ModelConfig, fam: Family, i: int, fused: bool) -> dict[str, tuple[str, tuple]]:
    """The router, expert and shared-expert tensors of MoE layer i."""
    moe, mp, hm = cfg.moe_for_layer(i), f"layers.{i}.", f"model.layers.{i}.{fam.moe_module}."
    names: dict[str, tuple[str, tuple]] = {hm + "gate.weight": (mp + "mlp.router.gate.weight", ())}
    w_in, w_out, F = mp + "mlp.experts.w_in_EHD", mp + "mlp.experts.w_out_EDF", moe.expert_hidden
    if fused:
        names[hm + "experts.gate_up_proj"] = (w_in, ())
        names[hm + "experts.down_proj"] = (w_out, ())
    else:
        gate, up, down = fam.expert_names
        for e in range(moe.num_experts):
            names[f"{hm}experts.{e}.{gate}.weight"] = (w_in, (e, slice(0, F)))
            names[f"{hm}experts.{e}.{up}.weight"] = (w_in, (e, slice(F, 2 * F)))
            names[f"{hm}experts.{e}.{down}.weight"] = (w_out, (e,))
    if fam.shared_expert:
        for p in ("gate_proj", "up_proj", "down_proj"):
            names[f"{hm}shared_expert.{p}.weight"] = (f"{mp}mlp.shared.{p}.weight", ())
        names[hm + "shared_expert_gate.weight"] = (mp + "mlp.shared_gate.weight", ())
    return names
