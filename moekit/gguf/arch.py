"""GGUF architecture maps: llama.cpp arch <-> moekit's Hugging Face family, and GGUF tensor names <-> DecoderLM slots.

llama.cpp's MoE architectures covered: "llama" with experts (Mixtral's layout), "qwen2moe", "qwen3moe",
"olmoe". `tensor_plan(cfg, arch)` gives each GGUF tensor name the moekit parameter (and index into it)
it holds, in moekit's own layout ([E, F, D] expert blocks are the same in both); `permute_qk` is the
Q/K row order llama.cpp's "llama" arch uses (interleaved RoPE pairs instead of HF's rotate-half halves).

Not here: reading and writing files (reader.py, writer.py), the family tables (moekit.hf.families).
"""

from __future__ import annotations

import torch

from ..hf.common import UnsupportedModelError

# GGUF general.architecture -> moekit.hf family (model_type)
ARCH_TO_FAMILY = {"llama": "mixtral", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe"}
FAMILY_TO_ARCH = {v: k for k, v in ARCH_TO_FAMILY.items()}
# llama.cpp renormalises the top-k weights for these archs (fixed in its graphs, not read from the file)
NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}
# tensors kept in F32 whatever the file type: the routers (and every 1-D tensor)
KEEP_F32 = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


class UnsupportedGGUFError(UnsupportedModelError):
    """A GGUF file of an architecture (or with a feature) moekit does not read or write."""


def check_arch(arch: str, where: str) -> str:
    if arch not in ARCH_TO_FAMILY:
        raise UnsupportedGGUFError(f"{where}: general.architecture={arch!r} is not supported; moekit reads and writes the "
                                   f"GGUF MoE architectures {', '.join(ARCH_TO_FAMILY)}")
    return ARCH_TO_FAMILY[arch]


def tensor_plan(cfg, arch: str) -> dict[str, tuple[str, tuple]]:
    """GGUF tensor name -> (moekit parameter name, index into it; () = all of it)."""
    plan = {"token_embd.weight": ("embed_tokens.weight", ()), "output_norm.weight": ("norm.weight", ()),
            "output.weight": ("lm_head.weight", ())}
    attn = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj"}
    for i in range(cfg.num_layers):
        b, m = f"blk.{i}.", f"layers.{i}."
        plan[b + "attn_norm.weight"] = (m + "input_layernorm.weight", ())
        plan[b + "ffn_norm.weight"] = (m + "post_attention_layernorm.weight", ())
        for g, h in attn.items():
            plan[f"{b}{g}.weight"] = (f"{m}self_attn.{h}.weight", ())
            if cfg.qkv_bias and g != "attn_output":
                plan[f"{b}{g}.bias"] = (f"{m}self_attn.{h}.bias", ())
        if cfg.qk_norm != "none":
            plan[b + "attn_q_norm.weight"] = (m + "self_attn.q_norm.weight", ())
            plan[b + "attn_k_norm.weight"] = (m + "self_attn.k_norm.weight", ())
        F = cfg.moe_for_layer(i).expert_hidden
        plan[b + "ffn_gate_inp.weight"] = (m + "mlp.router.gate.weight", ())
        plan[b + "ffn_gate_exps.weight"] = (m + "mlp.experts.w_in_EHD", (slice(None), slice(0, F)))
        plan[b + "ffn_up_exps.weight"] = (m + "mlp.experts.w_in_EHD", (slice(None), slice(F, 2 * F)))
        plan[b + "ffn_down_exps.weight"] = (m + "mlp.experts.w_out_EDF", ())
        if cfg.moe.num_shared_experts:
            for g, h in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                plan[f"{b}ffn_{g}_shexp.weight"] = (f"{m}mlp.shared.{h}.weight", ())
            plan[b + "ffn_gate_inp_shexp.weight"] = (m + "mlp.shared_gate.weight", ())
    return plan


def is_qk(name: str) -> str | None:
    """'q' / 'k' for an attention query / key weight (the tensors llama.cpp's llama arch permutes)."""
    if name.endswith("attn_q.weight"):
        return "q"
    if name.endswith("attn_k.weight"):
        return "k"
    return None


def permute_qk(w: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp's interleaved pairs (inverse=True: back)."""
    rows = w.shape[0]
    if inverse:
        return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
