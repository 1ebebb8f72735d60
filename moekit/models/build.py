"""Building a model from its config, and loading a saved one from its directory alone.

`build_model(cfg)` makes a DecoderLM and applies the transforms its config
names (pre-gated routing). `load_model(path)` reads a moekit run or checkpoint
directory: the model is built on the meta device, its weights are read once
from the safetensors file into it (no random initialisation first), and the
tokenizer comes from tokenizer.json. A quantized checkpoint (config.json's
"quantization" section) is rebuilt by applying `moekit.quantize` to the
meta-built model, then reading its integer tensors. Nothing here trains: the training recipes
(moekit.train) call these functions too.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoints import load_checkpoint, resolve_checkpoint
from ..config import from_dict
from ..data.text import Tokenizer
from ..errors import CheckpointError
from ..meta import on_meta
from .decoder import DecoderLM, ModelConfig
from .pregated import apply_pregated_routing

LEGACY_PREGATED_MARKER = "pregated.json"  # before `ModelConfig.pregated`, a marker file beside the run said so


def build_model(cfg: ModelConfig, empty: bool = False) -> DecoderLM:
    """A DecoderLM for `cfg`, with its config's transforms applied.

    empty=True: parameters on the meta device, never allocated nor initialised
    (buffers are real), for `load_state` to fill from a checkpoint without a
    second copy.
    """
    if empty:
        model = meta_decoder(cfg)
    else:
        model = DecoderLM(cfg)
    if cfg.pregated:
        apply_pregated_routing(model)
    return model


def model_config_of(config: dict, where: Path | str) -> ModelConfig:
    """The ModelConfig in a checkpoint's config.json (its 'model' section)."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{where} is not a moekit language-model checkpoint: its config.json has no 'model' section")
    return from_dict(ModelConfig, config["model"], f"{where}/config.json: model")


def is_expert_param(name: str) -> bool:
    """A routed expert's stacked weight, or its quantized codes/scales/zeros (what an expert budget keeps out of memory)."""
    return name.endswith(EXPERT_PARAMS) or name.rsplit("_", 1)[0].endswith(EXPERT_PARAMS) and name.endswith(QUANT_SUFFIXES)


EXPERT_PARAMS = (".experts.w_in_EHD", ".experts.w_out_EDF")
QUANT_SUFFIXES = ("_q", "_scale", "_zero")  # moekit.moe.quant_format's stored tensors


def load_model(path: str | Path, experts: bool = True) -> tuple[DecoderLM, Tokenizer, dict]:
    """(model in eval mode, tokenizer, the checkpoint's whole config dict) from a run or checkpoint directory.

    experts=False (lazy loading): the routed experts' weights are not read; they stay on the meta
    device until an offloading transform gives them fast slots filled from the checkpoint itself.
    """
    skip = None if experts else is_expert_param
    ckpt = load_checkpoint(resolve_checkpoint(path), optimizer=False, skip=skip)
    cfg = model_config_of(ckpt.config, ckpt.dir)
    if not cfg.pregated and _legacy_pregated(Path(path), ckpt.dir):
        cfg.pregated = True
    model = build_model(cfg, empty=True)
    if ckpt.config.get("quantization") is not None:
        _quantize_like(model, ckpt.config["quantization"], ckpt.dir, ckpt.model_state, skip)
    load_state(model, ckpt.model_state, skip)
    if cfg.tie_embeddings:  # assigning tensors unties them; tie again
        model.lm_head.weight = model.embed_tokens.weight
    if ckpt.tokenizer_path is None:
        raise CheckpointError(f"checkpoint {ckpt.dir} has no tokenizer.json")
    return model.eval(), Tokenizer.from_file(ckpt.tokenizer_path), ckpt.config


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], skip=None) -> None:
    """Strictly load `state` into a model built on the meta device (or anywhere): names and shapes checked first.

    Names for which skip(name) is True are left as they are (on the meta device when the model was built empty).
    """
    from ..checkpoints import check_state

    check_state(model, state, skip)
    # The tensors are the model's own memory (load_tensors reads them, no memory map): assign, do not copy.
    model.load_state_dict(state, strict=skip is None, assign=True)
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if p.is_meta and (skip is None or not skip(name)):
            raise CheckpointError(f"tensor {name!r} was not restored from the checkpoint")


def _quantize_like(model: DecoderLM, section, ckpt_dir: Path, state: dict[str, torch.Tensor], skip=None) -> None:
    """Apply the checkpoint's quantization to the meta-built model; a missing code or scale tensor is named."""
    from ..quantize import quantize_from_section

    quantize_from_section(model, section, f"{ckpt_dir}/config.json: quantization")
    missing = [k for k in model.state_dict()
               if k not in state and k.endswith(QUANT_SUFFIXES) and (skip is None or not skip(k))]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"quantized checkpoint {ckpt_dir} lacks the quantized tensor(s) {shown} "
                              f"(its config.json says {section.get('bits')}-bit): the file is incomplete or from another "
                              f"quantization; write it again with `moekit quantize`")


def meta_decoder(cfg: ModelConfig) -> DecoderLM:
    """A DecoderLM with its parameters on the meta device (buffers real, on the CPU), their initialisation skipped.

    A parameter is moved to meta as it is registered (its fresh `torch.empty` memory never touched), and the
    init ops on it are skipped: run on meta they would go through torch's reference kernels, which import
    torch._dynamo (~75 MB of RSS). The same goes for any computation on meta, hence no `torch.device("meta")`.
    """
    with on_meta():
        return DecoderLM(cfg)


def real_buffers(model: nn.Module, device: torch.device) -> None:
    """Recompute the buffers of a model built on the meta device (rotary tables; expert biases as zeros) on `device`.

    Parameters and quantized buffers stay on meta for a checkpoint to fill; a buffer left there is caught by `load_state`.
    """
    from ..modules import RotaryEmbedding

    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = module.compute_inv_freq().to(device)
        elif hasattr(module, "reset_buffers"):  # other rotary tables (MLA's YaRN), routers' expert biases
            module.reset_buffers(device)


def _legacy_pregated(path: Path, ckpt_dir: Path) -> bool:
    return any((d / LEGACY_PREGATED_MARKER).is_file() for d in (path, ckpt_dir, ckpt_dir.parent))
