"""Reading and writing moefy models: `load(DIR)` for converted and dense sources, `save(model, DIR)`.

A converted model's directory holds `moefy.json` (what to rebuild: kind,
model config, spec, router kind), `model.safetensors` and the source's
tokenizer files. `load` also reads the dense originals through the same call:
Hugging Face Llama / Mistral / Qwen2 / BERT directories and moekit
checkpoints. `save` writes into a temporary sibling and renames it into
place: a failure leaves nothing behind.

`load_generator` is the reading `moekit.infer.Engine.load` uses for
converted decoders (Read-ME ones included).

Not here: conversion (decoder.py, encoder.py), training (tune.py).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path


from ..checkpoints import load_tensors, save_tensors
from ..config import from_dict, to_dict
from ..errors import CheckpointError
from ..fileio import atomic_directory
from .spec import MoefyError

MANIFEST = "moefy.json"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "sentence_bert_config.json", "vocab.json", "merges.txt")


def source_kind(path: str | Path) -> tuple[str, dict | None]:
    """("moefy" | "decoder" | "encoder" | "moekit", the HF config or None) of a directory."""
    from ..hf.reader import is_hf_dir, read_config
    from .hf_dense import DECODER_TYPES, check_supported

    d = Path(path)
    if not d.exists():
        raise MoefyError(f"{d} does not exist: give a moekit checkpoint, a Hugging Face model directory or a moefy output")
    if (d / MANIFEST).is_file():
        return "moefy", None
    if is_hf_dir(d):
        hf = read_config(d)
        return ("decoder" if check_supported(hf, f"{d.name}/config.json") in DECODER_TYPES else "encoder"), hf
    return "moekit", None


def load(path: str | Path):
    """The model in DIR: converted (moefy.json) or a dense original, in eval mode."""
    d = Path(path)
    kind, hf = source_kind(d)
    if kind == "moefy":
        return _load_converted(d)
    if kind == "decoder":
        from .hf_dense import read_dense_decoder

        return read_dense_decoder(d, hf)
    if kind == "encoder":
        from .hf_dense import read_encoder

        return read_encoder(d, hf)
    from ..models.build import load_model

    try:
        model, tokenizer, _ = load_model(d)
    except CheckpointError as e:
        raise MoefyError(f"{d} is not a model moefy reads ({e}); accepted are moekit checkpoints and Hugging Face "
                         "llama, mistral, qwen2, bert directories") from None
    model.tokenizer = tokenizer
    return model


def is_moefy_dir(path: str | Path) -> bool:
    """Whether PATH is a directory written by `save` (a converted model)."""
    return Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


def load_generator(path: str | Path, experts: bool = True):
    """(model, tokenizer or None) of a converted decoder in DIR, for `moekit.infer.Engine.load`.

    experts=False (lazy, for offloading): the routed experts are not read; they stay on the meta device
    until the offloading transform fills fast slots from DIR's model.safetensors.
    A Read-ME model (kind readme_lm) comes back as a `ReadMeLM`, which routes ahead (`route_ahead`);
    its experts are stored under `lm.layers.N.mlp.experts.*`, the module paths the disk tier of
    offloading reads. An encoder output cannot generate: refused with a clear message.
    """
    from ..hf.reader import load_tokenizer

    d = Path(path)
    manifest = _manifest(d)
    if manifest.get("kind") not in ("decoder", "readme_lm"):
        raise MoefyError(f"{d} holds a converted {manifest.get('kind')} model, which does not generate text: "
                         "load it with moekit.moefy.load and call .encode")
    return _load_converted(d, experts), load_tokenizer(d)


def _manifest(d: Path) -> dict:
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoefyError(f"{d}/{MANIFEST} cannot be read: {e}") from None
    if not isinstance(manifest, dict) or "kind" not in manifest:
        raise MoefyError(f"{d}/{MANIFEST} is not a moefy manifest (written by moekit.moefy.save)")
    return manifest


def _load_converted(d: Path, experts: bool = True):
    manifest = _manifest(d)
    model = skeleton(manifest, d)
    if experts:
        tensors, _ = load_tensors(d / WEIGHTS)
        model.load_state_dict(tensors, strict=True)
    else:
        _load_without_experts(model, d / WEIGHTS)
    if manifest["kind"] == "decoder" and model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.moefy_manifest = {k: manifest[k] for k in ("spec", "router")}
    return model.eval()


def _load_without_experts(model, path: Path) -> None:
    """Every tensor but the routed experts' (those become meta tensors of the same shape and dtype)."""
    import torch
    import torch.nn as nn

    from ..models.build import is_expert_param, load_state

    for name, p in list(model.named_parameters()):
        if is_expert_param(name):
            owner, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            setattr(owner, attr, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))
    tensors, _ = load_tensors(path, skip=is_expert_param)
    load_state(model, tensors, skip=is_expert_param)


def skeleton(manifest: dict, d: Path):
    """An uninitialised model with the structure a manifest describes."""
    if manifest["kind"] == "decoder":
        from ..models.build import build_model
        from ..models.decoder import ModelConfig
        from .routers import install_routers

        model = build_model(from_dict(ModelConfig, manifest["model"], f"{d.name}/{MANIFEST}: model"))
        install_routers([layer.mlp for layer in model.layers], manifest["router"])
        return model
    if manifest["kind"] == "encoder":
        from .encoder import SentenceEncoder
        from .encoder_moe import EncoderMoE
        from .hf_dense import hf_tokenizer

        model = SentenceEncoder(manifest["hf_config"], hf_tokenizer(d), manifest["max_seq_length"])
        E, K, W, S = manifest["widths"]
        for layer in model.encoder.layer:
            layer.ffn = EncoderMoE(manifest["hf_config"]["hidden_size"], E, K, W, S, manifest["router"])
        return model
    if manifest["kind"] == "readme_lm":
        from .readme_lm import readme_skeleton

        return readme_skeleton(manifest, d)
    raise MoefyError(f"{d}/{MANIFEST}: kind={manifest['kind']!r} is unknown")


def manifest_of(model) -> dict:
    info = getattr(model, "moefy_manifest", None)
    if info is None:
        raise MoefyError("save() takes a model returned by moefy.convert (or moefy.load of a converted model)")
    base = {"format": "moekit-moefy", **info}
    if hasattr(model, "manifest_extra"):
        return {**base, **model.manifest_extra()}
    if hasattr(model, "hf_config"):
        moe = model.encoder.layer[0].ffn
        S = moe.shared_in.out_features if moe.shared_in is not None else 0
        return {**base, "kind": "encoder", "hf_config": model.hf_config, "max_seq_length": model.max_seq_length,
                "widths": [moe.cfg.num_experts, moe.cfg.top_k, moe.cfg.expert_hidden, S]}
    return {**base, "kind": "decoder", "model": to_dict(model.cfg)}


def save(model, out: str | Path, source: str | Path | None = None) -> Path:
    """Write a converted model to OUT (which must not exist or be empty), copying tokenizer files from `source`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoefyError(f"output {out} already exists and is not empty: choose a new directory")
    manifest = manifest_of(model)
    files = _tokenizer_files(source) if source is not None else []
    with atomic_directory(out, prefix=f".{out.name}-") as tmp:
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        save_tensors(tmp / WEIGHTS, {k: v.detach().contiguous() for k, v in model.state_dict().items()})
        for f in files:
            shutil.copy2(f, tmp / f.name)
    return out


def _tokenizer_files(source: str | Path) -> list[Path]:
    """The tokenizer files of `source`: a directory holding them, or a moekit run (its latest checkpoint's)."""
    d = Path(source)
    found = [d / name for name in TOKENIZER_FILES if (d / name).is_file()]
    if not found and d.is_dir() and not (d / WEIGHTS).is_file():
        try:  # a moekit run directory keeps its tokenizer in each step-* checkpoint
            from ..checkpoints import resolve_checkpoint

            ck = resolve_checkpoint(d)
            found = [ck / name for name in TOKENIZER_FILES if (ck / name).is_file()]
        except CheckpointError:
            pass
    if not found:  # (said, not silent: the output then takes token ids only)
        warnings.warn(f"source {d} holds no tokenizer ({', '.join(TOKENIZER_FILES)}), nor does a checkpoint in it: "
                      "the moefy output has none", stacklevel=3)
    return found
