"""Writing a quantized moekit checkpoint from a moekit checkpoint or a Hugging Face model directory.

`quantize_checkpoint(src, out, bits, group_size, symmetric, scope)` loads the
model, applies `moekit.quantize.quantize_model`, and writes `out` as a moekit
checkpoint directory: model.safetensors (the integer codes, scales and the
full-precision tensors), config.json (the source's config, or for a Hugging
Face source its model section, plus a "quantization" section) and
tokenizer.json. `moekit.models.build.load_model` (so `moekit generate`,
`moekit inspect`, `Engine.load`) rebuilds the quantized model from it.

Every check (source, spec, group widths, the output directory) runs before
anything is written, and the files go into a hidden temporary directory next
to `out` that is renamed into place only when complete: a refusal or a crash
leaves nothing behind. Not here: the formats and the transform
(moekit.moe.quant_format, moekit.quantize).
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoints import CONFIG_FILE, MODEL_FILE, _write_json, save_tensors
from ..config import to_dict
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_directory


def quantize_checkpoint(src: str | Path, out: str | Path, bits: int, group_size: int | None = None,
                        symmetric: bool = True, scope: str = "experts") -> Path:
    """Write the quantized checkpoint directory `out` (which must not exist, or be empty); returns it."""
    from ..quantize import quantization_section, quantize_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not an empty directory: give a new directory for the quantized checkpoint")
    model, tokenizer, config = _load_source(Path(src))
    quantize_model(model, bits=bits, group_size=group_size, symmetric=symmetric, scope=scope)
    config = {**config, "quantization": quantization_section(model)}
    with atomic_directory(out, fsync=True) as tmp:
        _write_json(tmp / CONFIG_FILE, config)
        save_tensors(tmp / MODEL_FILE, model.state_dict())
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out


def _load_source(src: Path):
    """(fp32 model, tokenizer or None, config dict to extend) from a moekit checkpoint or a Hugging Face directory."""
    from .. import hf
    from ..models.build import load_model

    if not src.exists():
        raise ConfigError(f"{src} does not exist: give a moekit run/checkpoint directory or a Hugging Face model directory")
    if hf.is_hf_dir(src):
        model = hf.load(src, dtype="float32")
        return model.eval(), hf.load_tokenizer(src), {"model": to_dict(model.cfg)}
    model, tokenizer, config = load_model(src)
    if config.get("quantization") is not None:
        raise CheckpointError(f"{src} is already quantized ({config['quantization'].get('bits')}-bit): quantize the "
                              f"full-precision checkpoint instead")
    return model, tokenizer, config
