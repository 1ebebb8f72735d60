"""Loading a GGUF file's block tensors as they are: which tensors stay blocks, the module swap, the byte copy.

`block_plan(plan, tensors, cfg)` says which tensors of a file stay in their block format (blocks.py's
`BLOCK_TYPES`): the routed experts of a layer whose gate, up and down tensors all are block types
(-> a `GGUFExperts`), and the attention projections, shared-expert MLPs and an untied output head
(-> a `GGUFLinear`). Everything else is read as floats by reader.py: F32/F16/BF16 tensors, norms and
routers, the token embedding (a lookup table: dequantized), and tensors of quantized types with no block
path here (Q4_1, Q3_K, IQ*, ...: dequantized to fp32 by gguf-py, as before).

`swap_block_modules(model, ...)` puts the storages into a model built with those weights left on the meta
device (no fp32 copy of them is ever allocated); `read_blocks(...)` copies each tensor's bytes from the
file once, straight into its buffer (file reads, not the memory map: the file's pages are not added to
the process's resident memory), rows of the llama arch's Q/K put back in Hugging Face order
(`permute_qk` permutes whole rows, so it applies to rows of blocks as to rows of floats).

Not here: the block formats (blocks.py), the modules (storage.py), the metadata and the float tensors
(reader.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from .arch import is_qk, permute_qk
from .blocks import dequantize, is_block_type
from .storage import GGUFExperts, GGUFLinear

EXPERT_TENSORS = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")
LINEAR_TENSORS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate_shexp.weight",
                  "ffn_up_shexp.weight", "ffn_down_shexp.weight")


def qtype_of(t) -> str:
    return t.tensor_type.name


def block_plan(plan: dict, tensors: dict, cfg) -> tuple[dict[int, tuple[str, str, str]], dict[str, str]]:
    """({MoE layer: (gate, up, down) types} of experts kept as blocks, {Linear module path: type})."""
    layers = {}
    for i in range(cfg.num_layers):
        names = [f"blk.{i}.{s}" for s in EXPERT_TENSORS]
        if all(n in tensors for n in names):
            types = tuple(qtype_of(tensors[n]) for n in names)
            if all(is_block_type(q) for q in types):
                layers[i] = types
    linears = {}
    for name, (slot, index) in plan.items():
        if (name == "output.weight" or name.endswith(LINEAR_TENSORS)) and not index and is_block_type(qtype_of(tensors[name])):
            linears[slot.removesuffix(".weight")] = qtype_of(tensors[name])
    return layers, linears


def skipped_params(layers: dict, linears: dict) -> set[str]:
    """The parameters the block storages replace (left on the meta device when the model is built)."""
    experts = {f"layers.{i}.mlp.experts.{w}" for i in layers for w in ("w_in_EHD", "w_out_EDF")}
    return experts | {f"{path}.weight" for path in linears}


def swap_block_modules(model, layers: dict, linears: dict, experts_on_meta: bool) -> None:
    """Replace the experts / Linears `block_plan` names with empty GGUFExperts / GGUFLinear (experts on meta if asked)."""
    for i, types in layers.items():
        mlp = model.get_submodule(f"layers.{i}.mlp")
        old = mlp.experts
        if getattr(old, "b_in_EH", None) is not None:
            raise ConfigError(f"MoE layer {i}'s experts carry biases, which GGUF block experts do not hold")
        E, _, D = old.w_in_EHD.shape
        mlp.experts = GGUFExperts(E, D, old.w_out_EDF.shape[2], types, old.activation, "auto",
                                  "meta" if experts_on_meta else "cpu")
    for path, qtype in linears.items():
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        setattr(parent, child, GGUFLinear(old.in_features, old.out_features, qtype, old.bias, what=path))


def block_target(model, name: str, slot: str, F: int | None = None) -> list[torch.Tensor]:
    """The uint8 buffers (one per expert for stacked experts, else one) that GGUF tensor `name` fills."""
    module = model.get_submodule(slot.rpartition(".")[0])
    if isinstance(module, GGUFLinear):
        return [module.weight_OB[0]]
    if name.endswith("ffn_down_exps.weight"):
        return list(module.w_out_EDB)
    gate = name.endswith("ffn_gate_exps.weight")
    if module.fused:
        rows = slice(0, F) if gate else slice(F, 2 * F)
        return [w[rows] for w in module.w_in_EHB]
    return list(module.w_gate_EFB if gate else module.w_up_EFB)


def read_blocks(path: Path, t, targets: list[torch.Tensor], cfg, arch: str) -> None:
    """Copy tensor `t`'s blocks from the file into `targets` (its experts in order), checking every size."""
    need = sum(x.numel() for x in targets)
    if int(t.n_bytes) != need:
        raise CheckpointError(f"{path.name}: tensor {t.name} holds {int(t.n_bytes)} bytes of {qtype_of(t)} blocks but the "
                              f"model needs {need} (its shape does not fit the metadata)")
    qk = is_qk(t.name) if arch == "llama" else None
    with open(path, "rb") as f:
        f.seek(int(t.data_offset))
        for dst in targets:
            buf = dst if dst.is_contiguous() and not qk else torch.empty(dst.shape, dtype=torch.uint8)
            got = f.readinto(memoryview(buf.numpy()).cast("B"))
            if got != buf.numel():
                raise CheckpointError(f"{path.name} is truncated: tensor {t.name} needs {need} bytes of {qtype_of(t)} "
                                      f"blocks from offset {int(t.data_offset)}, the file ends before them")
            if qk:
                buf = permute_qk(buf, cfg.num_heads if qk == "q" else cfg.num_kv_heads, inverse=True)
            if buf is not dst:
                dst.copy_(buf)


def dequantize_blocks_into(target: torch.Tensor, t, chunk_rows: int = 4096) -> None:
    """A block-typed tensor (the token embedding) dequantized into fp32 `target` [rows, cols], a chunk of rows at a time."""
    raw = t.data.reshape(-1, t.data.shape[-1])
    if raw.shape[0] != target.shape[0]:
        raise CheckpointError(f"tensor {t.name} has {raw.shape[0]} rows but the model needs {target.shape[0]}")
    for start in range(0, raw.shape[0], chunk_rows):
        rows = torch.from_numpy(raw[start : start + chunk_rows].copy())
        target[start : start + chunk_rows] = dequantize(rows, qtype_of(t))
