"""DeepSeek-V2 and DeepSeek-V3 (`deepseek_v2`, `deepseek_v3`): config mapping, tensor names and export config.

What differs from the table families (families.py): multi-head latent
attention (`ModelConfig.attention="mla"`, moekit.models.mla), ungated shared
experts (`mlp.shared_experts`), the first `first_k_dense_replace` layers
dense, and the routers: V3 sigmoid scores with the selection-only correction
bias (`mlp.gate.e_score_correction_bias` -> the router's `expert_bias`),
group-limited top-k by each group's best two, renormalised and scaled; V2
softmax, greedy or group-limited by each group's best one, scaled. The
multi-token-prediction layers of V3 checkpoints (layer index >= num_hidden_layers)
are not part of the model: `mtp_names` lists them so the reader skips them.

The functions register themselves as the families' hooks (families.HOOKS);
moekit.hf imports this module, so they are in place whenever moekit.hf is.

Not here: FP8 block dequantization (fp8.py), reading files (reader.py),
writing files (writer.py), the attention itself (moekit.models.mla).
"""

from __future__ import annotations

import re
from typing import Any

from ..config import MoEConfig
from ..models.decoder import ModelConfig
from ..models.mla import MLAConfig
from .families import Family, FamilyHooks, HOOKS, decoder_names, _need, _unsupported

MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")
_MTP = re.compile(r"^model\.layers\.(\d+)\.")


# ---------------------------------------------------------------- config: Hugging Face -> moekit


def model_config(hf: dict, where: str, fam: Family) -> ModelConfig:
    """The ModelConfig of a deepseek_v2 / deepseek_v3 config.json (refusing what moekit does not compute)."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported(where, fam, f"hidden_act={act!r} (only 'silu', i.e. SwiGLU experts)")
    quant = hf.get("quantization_config")
    if quant and (not isinstance(quant, dict) or quant.get("quant_method") != "fp8"):
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise _unsupported(where, fam, f"quantization_config.quant_method={method!r} (only 'fp8' block quantization, "
                                       "dequantized on load)")
    if hf.get("mlp_bias"):
        raise _unsupported(where, fam, "mlp_bias=true")
    freq = int(hf.get("moe_layer_freq") or 1)
    if freq != 1:
        raise _unsupported(where, fam, f"moe_layer_freq={freq} (transformers makes every layer after "
                                       "first_k_dense_replace an MoE layer; only 1)")
    hidden, heads = int(_need(hf, where, fam, "hidden_size")), int(_need(hf, where, fam, "num_attention_heads"))
    return ModelConfig(
        vocab_size=int(_need(hf, where, fam, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(_need(hf, where, fam, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=heads,
        max_seq_len=int(hf.get("max_position_embeddings") or 4096),
        rope_theta=_rope(hf)[0],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        ffn="moe",
        dense_hidden=int(_need(hf, where, fam, "intermediate_size")),
        first_k_dense=int(hf.get("first_k_dense_replace") or 0),
        moe=_moe(hf, where, fam, hidden),
        attention="mla",
        mla=_mla(hf, where, fam),
    )


def _rope(hf: dict) -> tuple[float, dict]:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta"))
    return float(theta if theta is not None else 10000.0), params


def _mla(hf: dict, where: str, fam: Family) -> MLAConfig:
    _, params = _rope(hf)
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "yarn"):
        raise _unsupported(where, fam, f"rope_type={kind!r} (only 'default' and 'yarn')")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _unsupported(where, fam, f"partial_rotary_factor={params['partial_rotary_factor']}")
    interleave = bool(hf.get("rope_interleave", True)) if fam.model_type == "deepseek_v3" else True
    mla = dict(
        q_lora_rank=int(hf.get("q_lora_rank") or 0),
        kv_lora_rank=int(_need(hf, where, fam, "kv_lora_rank")),
        qk_nope_head_dim=int(_need(hf, where, fam, "qk_nope_head_dim")),
        qk_rope_head_dim=int(_need(hf, where, fam, "qk_rope_head_dim")),
        v_head_dim=int(_need(hf, where, fam, "v_head_dim")),
        rope_interleave=interleave,
        bias=bool(hf.get("attention_bias", False)),
    )
    if kind == "yarn":
        max_len = int(hf.get("max_position_embeddings") or 4096)
        original = int(params.get("original_max_position_embeddings") or max_len)
        factor = params.get("factor")
        mla.update(
            yarn_factor=float(factor if factor is not None else max_len / original),
            yarn_original_max_len=original,
            yarn_beta_fast=float(params.get("beta_fast") or 32),
            yarn_beta_slow=float(params.get("beta_slow") or 1),
            yarn_mscale=float(params.get("mscale") or 0.0),
            yarn_mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
            yarn_attention_factor=float(params.get("attention_factor") or 0.0),
            yarn_truncate=bool(params.get("truncate", True)),
        )
    return MLAConfig(**mla)


def _moe(hf: dict, where: str, fam: Family, hidden: int) -> MoEConfig:
    E = int(_need(hf, where, fam, "n_routed_experts", "num_local_experts", "num_experts"))
    shared = int(hf.get("n_shared_experts") or 0)
    width = int(_need(hf, where, fam, "moe_intermediate_size"))
    common = dict(hidden_size=hidden, num_experts=E, top_k=int(_need(hf, where, fam, "num_experts_per_tok")),
                  expert_hidden=width, num_shared_experts=shared, shared_expert_hidden=width if shared else 0,
                  routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0))
    if fam.model_type == "deepseek_v3":
        return MoEConfig(score_func="sigmoid", norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                         n_group=int(hf.get("n_group") or 1), topk_group=int(hf.get("topk_group") or 1),
                         group_score_experts=2, selection_bias=True, **common)
    method = hf.get("topk_method") or "greedy"
    if method not in V2_TOPK_METHODS:
        raise _unsupported(where, fam, f"topk_method={method!r} (only {', '.join(V2_TOPK_METHODS)})")
    if hf.get("norm_topk_prob"):
        raise _unsupported(where, fam, "norm_topk_prob=true (transformers' deepseek_v2 never renormalises)")
    grouped = method == "group_limited_greedy"
    return MoEConfig(score_func="softmax", norm_topk_prob=False, n_group=int(hf.get("n_group") or 1) if grouped else 1,
                     topk_group=int(hf.get("topk_group") or 1) if grouped else 1, group_score_experts=1, **common)


# ---------------------------------------------------------------- tensor names


def expected_names(cfg: ModelConfig, fam: Family, fused: bool) -> dict[str, tuple[str, tuple]]:
    """Hugging Face tensor name -> (moekit parameter or buffer name, index) for a DeepSeek model."""
    m = cfg.mla
    attn = ["q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"] if m.q_lora_rank else ["q_proj.weight"]
    attn += ["kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"]
    if m.bias:
        attn += ["kv_a_proj_with_mqa.bias", "o_proj.bias"] + (["q_a_proj.bias"] if m.q_lora_rank else [])

    def moe_extra(i: int) -> dict[str, tuple[str, tuple]]:  # V3's correction bias, the shared experts
        hp, mp = f"model.layers.{i}.", f"layers.{i}."
        extra: dict[str, tuple[str, tuple]] = {}
        if fam.model_type == "deepseek_v3":
            extra[f"{hp}mlp.gate.e_score_correction_bias"] = (f"{mp}mlp.router.expert_bias", ())
        if cfg.moe_for_layer(i).num_shared_experts:
            for p in ("gate_proj", "up_proj", "down_proj"):
                extra[f"{hp}mlp.shared_experts.{p}.weight"] = (f"{mp}mlp.shared.{p}.weight", ())
        return extra

    return decoder_names(cfg, fam, attn, fused, moe_extra)


def mtp_names(names, cfg: ModelConfig) -> set[str]:
    """The multi-token-prediction tensors: layers numbered num_layers and beyond (not part of the model)."""
    out = set()
    for n in names:
        match = _MTP.match(n)
        if match and int(match.group(1)) >= cfg.num_layers:
            out.add(n)
    return out


# ---------------------------------------------------------------- export


def fit_problems(cfg: ModelConfig, fam: Family) -> list[str]:
    """Why a moekit config does not fit deepseek_v2 / deepseek_v3 (empty: it fits)."""
    m, problems = cfg.moe, []
    if cfg.attention != "mla":
        problems.append(f"attention={cfg.attention!r} (this family uses multi-head latent attention, 'mla')")
    if cfg.dense_layers or cfg.moe_layer_freq != 1:
        problems.append("dense layers other than the first k (dense_layers / moe_layer_freq)")
    if m.num_shared_experts and m.shared_expert_gate:
        problems.append("a gated shared expert (DeepSeek's shared experts have no gate)")
    if m.num_shared_experts and m.shared_expert_hidden not in (0, m.expert_hidden):
        problems.append("shared_expert_hidden != expert_hidden (DeepSeek's shared experts are expert-sized)")
    v3 = fam.model_type == "deepseek_v3"
    want = "sigmoid" if v3 else "softmax"
    if m.score_func != want:
        problems.append(f"score_func={m.score_func!r} ({fam.model_type} uses {want!r})")
    if m.n_group > 1 and m.group_score_experts != (2 if v3 else 1):
        problems.append(f"group_score_experts={m.group_score_experts} ({fam.model_type} scores a group by its best "
                        f"{2 if v3 else 1})")
    if not v3 and not cfg.mla.rope_interleave:
        problems.append("rope_interleave=false (deepseek_v2 always uses interleaved rotary pairs)")
    if not v3 and m.norm_topk_prob:
        problems.append("norm_topk_prob=true (deepseek_v2 never renormalises)")
    if v3 and m.bias_update_rate > 0:
        problems.append("aux-loss-free balancing bias still training (bias_update_rate > 0)")
    if not v3 and (m.bias_update_rate > 0 or m.selection_bias):
        problems.append("an expert-selection bias (bias_update_rate > 0 or selection_bias; only deepseek_v3 has one)")
    return problems


def hf_config(cfg: ModelConfig, fam: Family) -> dict[str, Any]:
    """The family-specific keys of config.json for a DeepSeek model."""
    m, a = cfg.moe, cfg.mla
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if a.yarn_factor != 1.0:
        rope.update(rope_type="yarn", factor=a.yarn_factor, original_max_position_embeddings=a.yarn_original_max_len,
                    beta_fast=a.yarn_beta_fast, beta_slow=a.yarn_beta_slow, truncate=a.yarn_truncate)
        rope.update({k: v for k, v in (("mscale", a.yarn_mscale), ("mscale_all_dim", a.yarn_mscale_all_dim),
                                       ("attention_factor", a.yarn_attention_factor)) if v})
    data: dict[str, Any] = dict(
        num_key_value_heads=cfg.num_heads, rope_parameters=rope, intermediate_size=cfg.dense_hidden,
        moe_intermediate_size=m.expert_hidden, n_routed_experts=m.num_experts, n_shared_experts=m.num_shared_experts,
        first_k_dense_replace=cfg.first_k_dense, routed_scaling_factor=m.routed_scaling_factor,
        q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, attention_bias=a.bias,
        n_group=m.n_group, topk_group=m.topk_group, norm_topk_prob=m.norm_topk_prob,
    )
    if fam.model_type == "deepseek_v3":
        data.update(rope_interleave=a.rope_interleave, num_nextn_predict_layers=0)
    else:
        data.update(topk_method="group_limited_greedy" if m.n_group > 1 else "greedy", mlp_bias=False)
    return data


HOOKS.update({t: FamilyHooks(model_config, expected_names, fit_problems, hf_config) for t in MODEL_TYPES})
