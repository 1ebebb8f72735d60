"""Hugging Face checkpoints in and out: `moekit.hf.load(dir)` and `moekit.hf.save(model, dir, arch=...)`.

Families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, Granite-MoE, PhiMoE, GPT-OSS. The parts:

- families.py: the per-family tables and quirks, `model_config_from_hf`, tensor names;
- families_more.py / writer_more.py: the Granite-MoE, PhiMoE and GPT-OSS mappings (in / out);
- common.py: `Family`, `Convert` (stored layout <-> moekit's), the error; mxfp4.py: MXFP4 dequantization;
- reader.py: reading a model directory (`load`, `is_hf_dir`, `load_tokenizer`, dtype and device);
- deepseek.py: DeepSeek-V2/V3 (multi-head latent attention) config and names; fp8.py: FP8 block dequantization;
- writer.py: writing a moekit model in a family's layout (`save`, `convert`, `fit_problems`).

This file only re-exports the public names (`moekit.hf.load` and
`moekit.hf.save` are the functions). Not here: chat templates, special
tokens and stop ids as generation uses them (moekit.infer.chat).
"""

from . import deepseek  # noqa: F401  (registers the deepseek_v2 / deepseek_v3 hooks)
from .families import CONFIG_FILE, FAMILIES, SUPPORTED_MODEL_TYPES, Family, UnsupportedModelError, model_config_from_hf
from .reader import INDEX_FILE, SINGLE_FILE, is_hf_dir, load, load_tokenizer, resolve_device, resolve_dtype, weight_files
from .writer import convert, fit_problems, hf_config, save

__all__ = [
    "load", "save", "convert", "is_hf_dir", "load_tokenizer", "resolve_device", "resolve_dtype", "weight_files",
    "model_config_from_hf", "fit_problems", "hf_config", "Family", "FAMILIES", "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError", "CONFIG_FILE", "SINGLE_FILE", "INDEX_FILE",
]
