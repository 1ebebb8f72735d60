"""Reading a GGUF MoE file into an eval-mode DecoderLM: `load(path)`, `load_tokenizer(path)`, `is_gguf`.

The metadata (`{arch}.*` keys) is mapped onto the Hugging Face config dict of the matching family and
handed to `moekit.hf.model_config_from_hf`, so the same checks and refusals apply as for a Hugging Face
directory; llama.cpp's fixed choices (top-k renormalisation per arch) are what the config says.

Weights (`load(path, blocks=True)`, the default): tensors in a block type moekit runs (Q8_0, Q4_0, Q5_0,
Q4_K, Q5_K, Q6_K: blocks.py) stay in it, resident at their file size: the routed experts as a `GGUFExperts`,
attention / shared-expert / head matrices as `GGUFLinear` (storage.py; which ones and how they are read:
block_load.py). F32/F16/BF16 tensors, norms, routers and the token embedding are floats; a tensor of a
quantized type with no block path here (Q4_1, Q3_K, IQ4_NL, ...) is dequantized to fp32 by gguf-py
(`gguf.quants.dequantize`), as is every tensor with blocks=False. A type gguf-py cannot dequantize
either is one UnsupportedGGUFError naming the types moekit runs; a file cut short is one CheckpointError
naming the tensor. Q/K rows of the "llama" arch are put back in Hugging Face order. The tokenizer: a
"gpt2" vocab becomes a byte-level BPE `tokenizers` Tokenizer; a "llama" (SentencePiece) vocab a Unigram
over its scores with byte fallback (best effort).

`load(path, experts=False)` leaves the routed experts on the meta device (lazy loading: an expert budget's
slow tier, moekit.infer.offload.gguf_tier, reads them per expert from the file: raw blocks into
GGUFExperts slots, or with `dequantize_expert`, which dequantizes one expert's block of a stacked
`ffn_*_exps` tensor, into full-precision slots).

Not here: writing GGUF (writer.py), the name maps (arch.py), requantizing to moekit's int8/int4
storage (moekit.quantize on the loaded model; per expert, moekit.infer.offload.requant).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, MoekitError
from .arch import ARCH_TO_FAMILY, NORM_TOPK, UnsupportedGGUFError, check_arch, is_qk, permute_qk, tensor_plan
from .block_load import EXPERT_TENSORS, block_plan, block_target, dequantize_blocks_into, qtype_of, read_blocks, skipped_params, swap_block_modules
from .blocks import BLOCK_TYPES, FLOAT_TYPES, is_block_type

MAGIC = b"GGUF"


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == MAGIC


def open_gguf(path: str | Path):
    """A gguf.GGUFReader over the file (a CheckpointError for a truncated or corrupt one)."""
    import gguf

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"GGUF file {p} does not exist")
    try:
        return _checked_reader(str(p))
    except _Truncated as e:
        raise CheckpointError(f"{p} is truncated or corrupt: {e}") from None
    except Exception as e:
        raise CheckpointError(f"{p} is not a readable GGUF file (truncated or corrupt?): {e}") from None


class _Truncated(Exception):
    pass


def _reader_class():
    import gguf

    class CheckedReader(gguf.GGUFReader):
        """gguf's reader, first checking that every tensor's bytes lie inside the file (one message naming it)."""

        def _build_tensors(self, start_offs, fields):
            size = len(self.data)
            for field in fields:
                _, name, _, dims, raw_dtype, offset = field.parts
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    continue  # (gguf's own error names an unknown type)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                need = int(np.prod(dims)) * type_size // block
                end = int(start_offs + offset[0]) + need
                if end > size:
                    raise _Truncated(f"tensor {bytes(name).decode(errors='replace')} ({qtype.name}) needs {need} bytes "
                                     f"ending at offset {end}, but the file ends at {size}")
            return super()._build_tensors(start_offs, fields)

    return CheckedReader


def _checked_reader(path: str):
    return _reader_class()(path)


def _fields(reader) -> dict:
    return {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def hf_config(meta: dict, tensors: dict, where: str) -> dict:
    """The Hugging Face config dict of the family the GGUF metadata describes."""
    arch = str(meta.get("general.architecture"))
    family = check_arch(arch, where)
    k = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    if not k("expert_count"):
        raise UnsupportedGGUFError(f"{where}: a dense {arch} model (no {arch}.expert_count); moekit reads MoE GGUF files")
    scaling = k("rope.scaling.type")
    if scaling not in (None, "none"):
        raise UnsupportedGGUFError(f"{where}: {arch}.rope.scaling.type={scaling!r} is not supported (only plain RoPE)")
    hidden, heads = int(k("embedding_length")), int(k("attention.head_count"))
    head_dim = int(k("attention.key_length") or hidden // heads)
    if int(k("rope.dimension_count") or head_dim) != head_dim:
        raise UnsupportedGGUFError(f"{where}: partial rotary ({arch}.rope.dimension_count != head dim {head_dim})")
    emb = tensors["token_embd.weight"]
    gate = tensors["blk.0.ffn_gate_exps.weight"]
    hf = {
        "model_type": family, "vocab_size": int(emb.shape[1]), "hidden_size": hidden,
        "num_hidden_layers": int(k("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(k("attention.head_count_kv") or heads), "head_dim": head_dim,
        "max_position_embeddings": int(k("context_length") or 4096), "rms_norm_eps": float(k("attention.layer_norm_rms_eps", 1e-6)),
        "rope_theta": float(k("rope.freq_base", 10000.0)), "tie_word_embeddings": "output.weight" not in tensors,
        "num_experts_per_tok": int(k("expert_used_count")), "norm_topk_prob": NORM_TOPK[arch],
        "num_local_experts": int(k("expert_count")), "num_experts": int(k("expert_count")),
        "intermediate_size": int(gate.shape[1]), "moe_intermediate_size": int(gate.shape[1]),
    }
    if family == "olmoe":
        hf.pop("head_dim")
    if family == "qwen2_moe":
        hf["qkv_bias"] = "blk.0.attn_q.bias" in tensors
        hf["shared_expert_intermediate_size"] = int(tensors["blk.0.ffn_gate_shexp.weight"].shape[1])
    return hf


def cannot_run(t) -> str:
    """The message for a tensor type moekit can neither run as blocks nor dequantize."""
    return (f"tensor {t.name} is stored as GGUF type {t.tensor_type.name}, which moekit cannot run: it runs "
            f"{', '.join(BLOCK_TYPES)} in block form and {', '.join(FLOAT_TYPES)} (and the other quantized types "
            f"gguf-py dequantizes, as fp32) as floats")


def _dequantized(t) -> torch.Tensor:
    from gguf.quants import dequantize

    try:
        data = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise UnsupportedGGUFError(cannot_run(t)) from None
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))


def expert_tensors(reader, layer: int) -> dict[str, object]:
    """{"gate", "up", "down"}: the GGUF tensors (ReaderTensor) of MoE layer `layer`'s stacked experts."""
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for key, suffix in zip(("gate", "up", "down"), EXPERT_TENSORS):
        name = f"blk.{layer}.{suffix}"
        if name not in tensors:
            raise CheckpointError(f"the GGUF file lacks {name}, the experts of MoE layer {layer}")
        out[key] = tensors[name]
    return out


def dequantize_expert(t, expert: int) -> torch.Tensor:
    """Expert `expert`'s fp32 matrix [rows, cols] of a stacked GGUF expert tensor, read from its memory map."""
    from gguf.quants import dequantize

    try:
        data = dequantize(t.data[expert], t.tensor_type)
    except NotImplementedError:
        raise UnsupportedGGUFError(cannot_run(t)) from None
    except Exception as e:
        raise CheckpointError(f"tensor {t.name} cannot be read (truncated or corrupt?): {e}") from None
    rows, cols = int(t.shape[1]), int(t.shape[0])
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(rows, cols))


def load(path: str | Path, dtype=None, device=None, experts: bool = True, blocks: bool = True):
    """A GGUF MoE file (llama with experts, qwen2moe, qwen3moe, olmoe) as an eval-mode DecoderLM.

    blocks=True: tensors in a block type moekit runs (Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K) stay in it, resident at
    their file size (GGUFExperts / GGUFLinear, block_load.py); blocks=False: every tensor dequantized to
    floats in `dtype` (what requantizing at load, moekit.quantize, starts from).
    experts=False: the routed experts' weights are not read (they stay on the meta device).
    """
    from .. import hf

    p = Path(path)
    reader = open_gguf(p)
    meta = _fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg, arch, plan = _model_plan(meta, tensors, p)
    layers, linears = block_plan(plan, tensors, cfg) if blocks else ({}, {})
    model = _build(cfg, layers, linears, experts)
    with torch.no_grad():
        for name, (slot, index) in plan.items():
            expert = name.endswith(EXPERT_TENSORS)
            if experts or not expert:
                _read(model, name, slot, index, tensors[name], cfg, arch, p, (layers, linears))
    _place(model, hf.resolve_device(device), hf.resolve_dtype(dtype))
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def _model_plan(meta: dict, tensors: dict, p: Path):
    """(ModelConfig, arch, tensor_plan) of the file, its tensors checked against the metadata."""
    from .. import hf

    try:
        cfg_dict = hf_config(meta, tensors, p.name)
    except KeyError as e:
        raise CheckpointError(f"{p.name}: GGUF lacks {e.args[0]}, which a MoE model needs") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p.name}: GGUF metadata is malformed: {e}") from None
    cfg = hf.model_config_from_hf(cfg_dict, p.name)
    arch = str(meta["general.architecture"])
    plan = tensor_plan(cfg, arch)
    if cfg.tie_embeddings:
        plan.pop("output.weight")
    missing, extra = sorted(set(plan) - set(tensors)), sorted(set(tensors) - set(plan) - {"rope_freqs.weight"})
    if missing or extra:
        raise CheckpointError(f"{p.name}: the tensors do not fit the metadata: missing {missing[:3]}, unexpected {extra[:3]}")
    return cfg, arch, plan


def _build(cfg, layers: dict, linears: dict, experts: bool):
    """The fp32 model on the CPU, uninitialised; block-stored weights and (experts=False) unread experts left unallocated."""
    from ..hf.reader import _empty_model
    from ..models.build import is_expert_param

    blocked = skipped_params(layers, linears)
    model = _empty_model(cfg, torch.float32, torch.device("cpu"),
                         skip=lambda name: name in blocked or (not experts and is_expert_param(name)))
    swap_block_modules(model, layers, linears, experts_on_meta=not experts)
    return model


def _read(model, name: str, slot: str, index, t, cfg, arch: str, p: Path, blocked: tuple[dict, dict]) -> None:
    """GGUF tensor `name` into the model: its blocks as they are, or dequantized into its float slot."""
    layers, linears = blocked
    layer = int(name.split(".")[1]) if name.startswith("blk.") else None
    is_expert = name.endswith(EXPERT_TENSORS)
    if (is_expert and layer in layers) or slot.removesuffix(".weight") in linears:
        F = cfg.moe_for_layer(layer).expert_hidden if is_expert else None
        read_blocks(p, t, block_target(model, name, slot, F), cfg, arch)
        return
    params = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
    if is_block_type(qtype_of(t)) and not index and t.name == "token_embd.weight":
        dequantize_blocks_into(params[slot].data, t)  # (not gguf-py's: its temporaries are several times the table)
        return
    _copy(params[slot], index, t, cfg, arch, p.name)


def _place(model, device: torch.device, dtype: torch.dtype) -> None:
    """Floats to `dtype` on `device` (as Module.to does); meta tensors stay on meta (in `dtype`), blocks stay uint8."""
    for module in model.modules():
        for name, t in list(module._parameters.items()):
            if t is not None:
                moved = torch.empty_like(t, dtype=dtype) if t.is_meta else t.data.to(device=device, dtype=dtype)
                module._parameters[name] = torch.nn.Parameter(moved, requires_grad=t.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and not b.is_meta:
                module._buffers[name] = b.to(device=device, dtype=dtype) if b.is_floating_point() else b.to(device)


def _copy(param, index, t, cfg, arch: str, where: str) -> None:
    target = param.data[index] if index else param.data
    try:
        value = _dequantized(t)
    except MoekitError:
        raise
    except Exception as e:
        raise CheckpointError(f"{where}: tensor {t.name} cannot be read (truncated or corrupt?): {e}") from None
    if arch == "llama" and is_qk(t.name):
        value = permute_qk(value, cfg.num_heads if is_qk(t.name) == "q" else cfg.num_kv_heads, inverse=True)
    if value.numel() != target.numel():
        raise CheckpointError(f"{where}: tensor {t.name} has shape {list(value.shape)} but the metadata needs {list(target.shape)}")
    target.copy_(value.reshape(target.shape))


def load_tokenizer(path: str | Path):
    """The tokenizer the GGUF metadata holds, as a moekit Tokenizer (None when it has none)."""
    from .tokenizer import tokenizer_from_metadata

    return tokenizer_from_metadata(_fields(open_gguf(path)))


__all__ = ["load", "load_tokenizer", "is_gguf", "open_gguf", "hf_config", "ARCH_TO_FAMILY"]
