"""Writing a moekit DecoderLM as a GGUF file that llama.cpp loads: `save(model, path, tokenizer, dtype=...)`, `convert`.

The family is chosen as `moekit.hf.save` chooses it (`fit_problems`), restricted to those llama.cpp's MoE
graphs compute the same way (arch.py), plus what those graphs fix (top-k renormalisation per arch, no
dense layers, plain RoPE); what no family has (`unexportable`: pre-gating, Mixture-of-Depths) is named
alone. Weights: F32, F16, Q8_0 or Q4_0 through the `gguf` package's writer and its own quantizers
(`gguf.quants.quantize`); 1-D tensors and routers stay F32, a matrix whose rows do not split into
32-wide blocks stays F16/F32. The tokenizer goes into `tokenizer.ggml.*` as a "gpt2" BPE vocab. The
file appears atomically (temporary sibling, then rename).

Not here: reading GGUF (reader.py), the Hugging Face layouts (moekit.hf).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..fileio import honour_umask
from ..hf.writer import fit_problems, unexportable
from .arch import FAMILY_TO_ARCH, KEEP_F32, NORM_TOPK, UnsupportedGGUFError, is_qk, permute_qk, tensor_plan

GGUF_TYPES = ("F32", "F16", "Q8_0", "Q4_0")
NO_MERGE = "<|no-merge|> <|no-merge|>"  # llama.cpp needs a merges key; the gguf writer refuses an empty array


def gguf_problems(model, family: str) -> list[str]:
    """Why `model` does not fit llama.cpp's graph for `family` (empty: it fits)."""
    cfg, arch = model.cfg, FAMILY_TO_ARCH[family]
    problems = fit_problems(model, family)
    if any(not cfg.is_moe_layer(i) for i in range(cfg.num_layers)):
        problems.append("dense layers (llama.cpp's MoE graphs make every layer MoE)")
    if cfg.moe.norm_topk_prob != NORM_TOPK[arch]:
        problems.append(f"norm_topk_prob={cfg.moe.norm_topk_prob} (llama.cpp's {arch} fixes it to {NORM_TOPK[arch]})")
    if cfg.rope_scaling:
        problems.append("rope_scaling (only plain RoPE)")
    return problems


def choose_family(model, arch: str = "auto") -> str:
    families = list(FAMILY_TO_ARCH) if arch == "auto" else [arch]
    if arch != "auto" and arch not in FAMILY_TO_ARCH:
        raise ConfigError(f"arch={arch!r} cannot be written as GGUF: accepted values are auto, {', '.join(FAMILY_TO_ARCH)}")
    refused = unexportable(model.cfg)
    if refused:
        raise UnsupportedGGUFError(f"the model cannot be written as GGUF: {'; '.join(refused)}")
    reasons = {f: gguf_problems(model, f) for f in families}
    for f, problems in reasons.items():
        if not problems:
            return f
    detail = "; ".join(f"{f}: {', '.join(p)}" for f, p in reasons.items())
    raise UnsupportedGGUFError(f"the model fits no GGUF architecture moekit writes ({detail})")


def _qtype(name: str, t: torch.Tensor, dtype: str):
    from gguf import GGMLQuantizationType as Q

    if t.dim() == 1 or name.endswith(KEEP_F32) or dtype == "F32":
        return Q.F32
    if dtype == "F16" or t.shape[-1] % 32:
        return Q.F16
    return Q[dtype]


def _tensors(model, arch: str, dtype: str):
    """(GGUF name, numpy data, quantization type) for each tensor, in GGUF order."""
    from gguf.quants import quantize

    params = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
    cfg = model.cfg
    for name, (slot, index) in tensor_plan(cfg, arch).items():
        t = params[slot].detach().float().cpu()
        t = t[index] if index else t
        if name.endswith("ffn_gate_inp_shexp.weight"):
            t = t.reshape(-1)
        if arch == "llama" and is_qk(name):
            t = permute_qk(t, cfg.num_heads if is_qk(name) == "q" else cfg.num_kv_heads)
        qtype = _qtype(name, t, dtype)
        yield name, quantize(np.ascontiguousarray(t.numpy()), qtype), qtype


def _metadata(w, cfg, arch: str) -> None:
    m = cfg.moe
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    w.add_name("moekit export")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(m.expert_hidden if arch in ("llama", "olmoe") else cfg.dense_hidden)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    moe = cfg.moe_for_layer(next(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)))  # every layer's (gguf_problems)
    w.add_expert_count(moe.num_experts)
    w.add_expert_used_count(moe.top_k)
    if arch != "llama":
        w.add_expert_feed_forward_length(m.expert_hidden)
    if m.num_shared_experts:
        w.add_expert_shared_feed_forward_length((m.shared_expert_hidden or m.expert_hidden) * m.num_shared_experts)
    w.add_file_type(0)


def _tokenizer_metadata(w, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" vocab (tokens, types, merges, EOS)."""
    from gguf import TokenType

    backend = tokenizer.backend
    vocab = backend.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [TokenType.CONTROL if t in special else TokenType.UNUSED if t.startswith("[PAD") and i not in by_id
             else TokenType.NORMAL for i, t in enumerate(tokens)]
    merges = json.loads(backend.to_str()).get("model", {}).get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges] or [NO_MERGE]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_add_bos_token(False)
    if tokenizer.eos_id is not None:
        w.add_eos_token_id(tokenizer.eos_id)
        w.add_bos_token_id(tokenizer.eos_id)


def save(model, path: str | Path, tokenizer=None, dtype: str = "F32", arch: str = "auto") -> Path:
    """Write `model` (and its tokenizer) as one GGUF file of weight type `dtype` (F32, F16, Q8_0, Q4_0)."""
    import gguf

    if dtype not in GGUF_TYPES:
        raise ConfigError(f"gguf dtype={dtype!r} is unknown: accepted values are {', '.join(GGUF_TYPES)}")
    out = Path(path)
    if out.exists():
        raise ConfigError(f"output file {out} exists: choose a new path")
    family = choose_family(model, arch)
    garch = FAMILY_TO_ARCH[family]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{out.name}-", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, garch)
        _metadata(w, model.cfg, garch)
        if tokenizer is not None:
            _tokenizer_metadata(w, tokenizer, model.cfg.vocab_size)
        for name, data, qtype in _tensors(model, garch, dtype):
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        honour_umask(tmp)  # (mkstemp made it 0600)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def convert(src: str | Path, out: str | Path, dtype: str = "F32", arch: str = "auto") -> Path:
    """A moekit run/checkpoint or a Hugging Face model directory written as a GGUF file."""
    from .. import hf
    from ..models.build import load_model

    if hf.is_hf_dir(src):
        model, tokenizer = hf.load(src), hf.load_tokenizer(src)
    else:
        model, tokenizer, _ = load_model(src)
    return save(model.float(), out, tokenizer, dtype=dtype, arch=arch)
