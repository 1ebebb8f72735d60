"""Writing a moekit `DecoderLM` as a Hugging Face checkpoint: `save(model, out_dir, arch=...)` and `convert`.

`save` writes a model in the layout of a family it fits, as transformers
itself writes it (config.json, per-expert tensors in one model.safetensors or
in shards plus an index, and the tokenizer files when given a tokenizer), so
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` gives the same
logits. A model that fits no family is refused before anything is written,
with an error naming each feature in the way (`fit_problems`); a feature no
family has (`unexportable`: pre-gated routing, Mixture-of-Depths layers) is
named alone, before any family is tried. The directory appears atomically (temporary sibling, then rename). `convert` does the same
for a moekit run/checkpoint directory.

Not here: the family tables and tensor names (families.py), reading
(reader.py), moekit's own checkpoint format (moekit.checkpoints).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..fileio import atomic_directory
from ..models.decoder import DecoderLM, ModelConfig
from . import writer_more as more
from .families import CONFIG_FILE, FAMILIES, HOOKS, SUPPORTED_MODEL_TYPES, UnsupportedModelError, expected_names
from .families_more import MORE_FAMILIES
from .reader import GENERATION_CONFIG_FILE, INDEX_FILE, SINGLE_FILE, TOKENIZER_CONFIG_FILE

def unexportable(cfg: ModelConfig) -> list[str]:
    """What `cfg` computes that no Hugging Face family (so no GGUF architecture either) has; empty: none."""
    problems = []
    if cfg.pregated:
        problems.append("pregated=true (pre-gated routing: layer i+1 routes on layer i's input; no Hugging Face "
                        "family does; accepted: pregated=false)")
    if cfg.mod_layers:
        problems.append(f"mod_layers={cfg.mod_layers} (Mixture-of-Depths layers compute for only some tokens; no "
                        f"Hugging Face family or llama.cpp graph does; accepted: mod_layers=[])")
    return problems


def fit_problems(model: DecoderLM, arch: str) -> list[str]:
    """Why `model` does not fit family `arch` (empty: it fits)."""
    if arch not in FAMILIES:
        raise ConfigError(f"arch={arch!r} is unknown: accepted values are {', '.join(SUPPORTED_MODEL_TYPES)}")
    fam, cfg = FAMILIES[arch], model.cfg
    problems = unexportable(cfg)
    if arch in HOOKS:
        return problems + _common_problems(cfg) + more.extra_features(cfg) + HOOKS[arch].fit_problems(cfg, fam)
    if cfg.attention != "gqa":
        problems.append(f"attention={cfg.attention!r} (this family uses grouped-query attention, 'gqa')")
    if arch in MORE_FAMILIES:
        return problems + more.fit_problems(cfg, arch)
    problems += more.extra_features(cfg)
    if cfg.ffn != "moe":
        problems.append(f"ffn={cfg.ffn!r} (only plain MoE layers)")
    if cfg.experts_per_layer and len(set(cfg.experts_per_layer)) > 1:
        problems.append("a pyramid of expert counts per layer (experts_per_layer)")
    m = cfg.moe
    if m.activation != "swiglu":
        problems.append(f"activation={m.activation!r} (only swiglu)")
    if m.router not in ("topk", "group") or (m.router == "group" and m.num_groups > 1):
        problems.append(f"router={m.router!r} (only top-k token choice)")
    if m.score_func != "softmax":
        problems.append(f"score_func={m.score_func!r} (only softmax)")
    if m.routed_scaling_factor != 1.0:
        problems.append(f"routed_scaling_factor={m.routed_scaling_factor}")
    if m.router_bias:
        problems.append("router_bias=true")
    if m.n_group > 1:
        problems.append(f"group-limited routing (n_group={m.n_group})")
    if m.bias_update_rate > 0 or m.selection_bias:
        problems.append("aux-loss-free balancing bias (bias_update_rate > 0 or selection_bias)")
    if m.eval_capacity_factor > 0:
        problems.append(f"eval_capacity_factor={m.eval_capacity_factor} (tokens dropped at inference)")
    if fam.model_type == "mixtral" and not m.norm_topk_prob:
        problems.append("norm_topk_prob=false (mixtral always renormalises the top-k weights)")
    if fam.shared_expert:
        if m.num_shared_experts == 0 or not m.shared_expert_gate:
            problems.append("no gated shared expert (qwen2_moe needs num_shared_experts >= 1 and shared_expert_gate=true)")
    elif m.num_shared_experts:
        problems.append(f"num_shared_experts={m.num_shared_experts} (this family has no shared expert)")
    if cfg.qk_norm != fam.qk_norm:
        problems.append(f"qk_norm={cfg.qk_norm!r} (this family uses {fam.qk_norm!r})")
    if cfg.qkv_bias and fam.bias_key != "qkv_bias":
        problems.append("qkv_bias=true (this family has no q/k/v bias)")
    if fam.qk_norm == "full" and cfg.head_dim not in (0, cfg.hidden_size // cfg.num_heads):
        problems.append(f"head_dim={cfg.head_dim} != hidden_size / num_heads")
    if not fam.dense_layers and any(not cfg.is_moe_layer(i) for i in range(cfg.num_layers)):
        problems.append("dense layers (first_k_dense / dense_layers / moe_layer_freq); this family makes every layer MoE")
    return problems


def _common_problems(cfg: ModelConfig) -> list[str]:
    """What no exported family computes (for the families with their own checks in HOOKS)."""
    m, problems = cfg.moe, []
    if cfg.ffn != "moe":
        problems.append(f"ffn={cfg.ffn!r} (only plain MoE layers)")
    problems += more.expert_count_problems(cfg)
    if m.activation != "swiglu":
        problems.append(f"activation={m.activation!r} (only swiglu)")
    if m.router != "topk":
        problems.append(f"router={m.router!r} (only top-k token choice)")
    if m.router_bias:
        problems.append("router_bias=true")
    if m.eval_capacity_factor > 0:
        problems.append(f"eval_capacity_factor={m.eval_capacity_factor} (tokens dropped at inference)")
    return problems


def hf_config(cfg: ModelConfig, arch: str, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of family `arch` describing `cfg` (which must fit it)."""
    if arch in MORE_FAMILIES:
        return more.hf_config(cfg, arch, dtype)
    fam, m = FAMILIES[arch], cfg.moe
    data: dict[str, Any] = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "num_experts_per_tok": m.top_k,
        "dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if cfg.head_dim and fam.model_type != "olmoe":
        data["head_dim"] = cfg.head_dim
    if arch in HOOKS:
        data.update(HOOKS[arch].hf_config(cfg, fam))
        data.update(attention_dropout=0.0, output_router_logits=False)
        return data
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    num_experts = cfg.moe_for_layer(moe_layers[0]).num_experts if moe_layers else m.num_experts
    if fam.model_type == "mixtral":
        data.update(num_local_experts=num_experts, intermediate_size=m.expert_hidden, sliding_window=None)
    elif fam.model_type == "olmoe":
        data.update(num_experts=num_experts, intermediate_size=m.expert_hidden, norm_topk_prob=m.norm_topk_prob,
                    clip_qkv=None, attention_bias=False)
    else:
        data.update(num_experts=num_experts, moe_intermediate_size=m.expert_hidden, intermediate_size=cfg.dense_hidden,
                    norm_topk_prob=m.norm_topk_prob, decoder_sparse_step=cfg.moe_layer_freq, use_sliding_window=False,
                    mlp_only_layers=sorted(set(range(cfg.first_k_dense)) | set(cfg.dense_layers)))
        if fam.model_type == "qwen2_moe":
            data.update(qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=(m.shared_expert_hidden or m.expert_hidden) * m.num_shared_experts)
        else:
            data.update(attention_bias=False)
    # Keys transformers reads but moekit has no counterpart for: fixed to what moekit computes.
    data.update(attention_dropout=0.0, router_aux_loss_coef=0.0, output_router_logits=False)
    return data


def state_to_hf(model: DecoderLM, arch: str) -> dict[str, torch.Tensor]:
    """The model's tensors under the family's Hugging Face names, experts split per expert."""
    params = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
    out: dict[str, torch.Tensor] = {}
    for hf_name, (name, index, *convert) in expected_names(model.cfg, FAMILIES[arch], fused=False).items():
        t = params[name].detach()
        t = t[index] if index else t
        out[hf_name] = (convert[0].save(t) if convert else t).contiguous().cpu()
    return out


def save(model: DecoderLM, out_dir: str | Path, arch: str = "auto", tokenizer=None,
         max_shard_bytes: int = 4 * 1024**3, chat_template: str | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint of family `arch` ("auto": the first family it fits).

    The directory is written atomically (temporary sibling, then rename);
    weights go to one model.safetensors, or to shards plus an index when they
    exceed `max_shard_bytes`.
    """
    arch = _choose_arch(model, arch)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output directory {out} exists and is not empty: choose a new directory")
    dtype = next(model.parameters()).dtype
    state = state_to_hf(model, arch)
    with atomic_directory(out) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config(model.cfg, arch, dtype), indent=2) + "\n")
        _write_weights(tmp, state, max_shard_bytes)
        if tokenizer is not None:
            _write_tokenizer(tmp, tokenizer, chat_template)
            eos = tokenizer.eos_id
            gen = {"eos_token_id": eos} if eos is not None else {}
            (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(gen, indent=2) + "\n")
    return out


def _choose_arch(model: DecoderLM, arch: str) -> str:
    if arch != "auto" and arch not in FAMILIES:
        raise ConfigError(f"arch={arch!r} is unknown: accepted values are {', '.join(SUPPORTED_MODEL_TYPES)}")
    refused = unexportable(model.cfg)
    if refused:
        raise UnsupportedModelError(f"the model cannot be written as a Hugging Face checkpoint: {'; '.join(refused)}")
    if arch != "auto":
        problems = fit_problems(model, arch)
        if problems:
            raise UnsupportedModelError(f"the model does not fit arch={arch!r}: {'; '.join(problems)}")
        return arch
    reasons = {a: fit_problems(model, a) for a in FAMILIES}
    for a, problems in reasons.items():
        if not problems:
            return a
    detail = "; ".join(f"{a}: {', '.join(p)}" for a, p in reasons.items())
    raise UnsupportedModelError(f"the model fits no Hugging Face family moekit exports ({detail})")


def _write_weights(d: Path, state: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(d / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def _write_tokenizer(d: Path, tokenizer, chat_template: str | None) -> None:
    tokenizer.save(d)
    tok_cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if tokenizer.eos_id is not None:
        eos = tokenizer.backend.id_to_token(tokenizer.eos_id)
        tok_cfg.update(eos_token=eos, pad_token=eos)
    if chat_template:
        tok_cfg["chat_template"] = chat_template
    (d / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tok_cfg, indent=2) + "\n")


# The chat format moekit checkpoints are served with (moekit.infer.chat.fallback_chat), as a Jinja template
# for transformers and other tools: "Role: content" turns joined by blank lines, then "Assistant:".
FALLBACK_CHAT_TEMPLATE = (
    "{% set names = {'system': 'System', 'developer': 'System', 'user': 'User', 'assistant': 'Assistant'} %}"
    "{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}{{ names[m['role']] + ': ' + m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)


def convert(checkpoint: str | Path, out_dir: str | Path, arch: str = "auto") -> Path:
    """A moekit run/checkpoint directory written as a Hugging Face model directory (with its chat format)."""
    from ..models.build import load_model

    model, tokenizer, _ = load_model(checkpoint)
    return save(model, out_dir, arch=arch, tokenizer=tokenizer, chat_template=FALLBACK_CHAT_TEMPLATE)
