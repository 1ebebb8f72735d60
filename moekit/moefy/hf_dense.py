"""Dense Hugging Face models moefy reads: Llama / Mistral / Qwen2 decoders and BERT encoders.

`dense_decoder_config` maps a decoder's config.json to a dense moekit
`ModelConfig` (SwiGLU FFN of `intermediate_size`), refusing what moekit would
compute differently; `read_dense_decoder` / `read_encoder` build the models
and copy the safetensors weights (decoder names are HF's without `model.`).
Not here: MoE families (moekit.hf), converted models (io.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import MoEConfig
from ..hf.reader import read_config, weight_files
from ..models.build import build_model
from ..models.decoder import ModelConfig
from .spec import MoefyError

DECODER_TYPES = ("llama", "mistral", "qwen2")
ENCODER_TYPES = ("bert",)
SUPPORTED = DECODER_TYPES + ENCODER_TYPES


def check_supported(hf: dict, where: str) -> str:
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise MoefyError(f"{where}: model_type={kind!r} is not supported by moefy; accepted are {', '.join(SUPPORTED)} "
                         "(Hugging Face) and moekit DecoderLM checkpoints")
    return kind


def _refuse(where: str, what: str) -> MoefyError:
    return MoefyError(f"{where}: {what} is not supported by moefy's dense decoder reader")


def dense_decoder_config(hf: dict, where: str) -> ModelConfig:
    kind = check_supported(hf, where)
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(where, f"hidden_act={hf.get('hidden_act')!r} (only 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise _refuse(where, "attention_bias / mlp_bias")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise _refuse(where, f"rope_type={rope.get('rope_type', rope.get('type'))!r}")
    theta = rope.get("rope_theta", hf.get("rope_theta")) or 10000.0
    max_len = int(hf.get("max_position_embeddings") or 4096)
    window = hf.get("sliding_window") if (kind == "mistral" or hf.get("use_sliding_window")) else None
    if window:  # within the window sliding attention equals full attention
        max_len = min(max_len, int(window))
    heads = int(hf["num_attention_heads"])
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]), num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(hf.get("head_dim") or 0),
        max_seq_len=max_len, rope_theta=float(theta), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=kind == "qwen2", tie_embeddings=bool(hf.get("tie_word_embeddings", False)), ffn="dense",
        dense_hidden=int(hf["intermediate_size"]),
        moe=MoEConfig(hidden_size=int(hf["hidden_size"]), num_experts=1, top_k=1, expert_hidden=1),
    )


def _read_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    files = weight_files(d)
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


@torch.no_grad()
def read_dense_decoder(path: str | Path, hf: dict | None = None):
    d = Path(path)
    hf = hf or read_config(d)
    cfg = dense_decoder_config(hf, f"{d.name}/config.json")
    model = build_model(cfg)
    state = {n.removeprefix("model."): t.float() for n, t in _read_tensors(d).items() if not n.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise MoefyError(f"{d}: weights do not match a {hf.get('model_type')} model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def sentence_config(d: Path) -> int:
    """max_seq_length from sentence_bert_config.json (256 when absent, as in all-MiniLM-L6-v2)."""
    import json

    p = d / "sentence_bert_config.json"
    return int(json.loads(p.read_text()).get("max_seq_length", 256)) if p.is_file() else 256


def hf_tokenizer(d: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


@torch.no_grad()
def read_encoder(path: str | Path, hf: dict | None = None):
    from .encoder import SentenceEncoder, hf_state_to_encoder

    d = Path(path)
    hf = hf or read_config(d)
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise MoefyError(f"{d}: only BERT encoders with hidden_act='gelu' and absolute positions are supported")
    model = SentenceEncoder(hf, hf_tokenizer(d), sentence_config(d))
    model.load_state_dict({k: v.float() for k, v in hf_state_to_encoder(_read_tensors(d)).items()}, strict=True)
    return model.eval()
