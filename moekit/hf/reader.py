"""Reading a Hugging Face model directory: `load(path)` -> an eval-mode `DecoderLM`.

`load` reads config.json (mapped onto `ModelConfig` by families.py), finds
the weights (one model.safetensors, or the shards an index names; pickles
are refused), builds the model on the meta device, allocates it once in the
target dtype and device, and reads each tensor from the file with positional
reads straight into its slot (expert tensors into their stacked `[E, ...]`
slots), so the weights are never held twice (a memory map left open while
reading would keep every touched page resident: a second copy). Also here: `is_hf_dir`, `resolve_dtype`,
`resolve_device`, and the low-level reading of the files stored beside the
weights (`load_tokenizer`, `tokenizer_config`, `stored_eos_token_id`), and
`experts_as_stored` (whether the experts can be read one at a time as stored).

Not here: the family tables and config mapping (families.py), writing
(writer.py), chat templates, special tokens and stop ids as generation uses
them (moekit.infer.chat), moekit's own checkpoint format (moekit.checkpoints).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoints import SAFETENSORS_DTYPES, read_into, read_tensor, safetensors_header
from ..errors import CheckpointError, ConfigError, MoekitError
from ..fileio import read_json
from ..models.build import is_expert_param, meta_decoder, real_buffers
from ..models.decoder import DecoderLM, ModelConfig
from . import fp8
from .deepseek import mtp_names
from .families import CONFIG_FILE, expected_names, family_of, model_config_from_hf

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints stored


def is_hf_dir(path: str | Path) -> bool:
    """A directory with a config.json that names a `model_type` (moekit's own config.json has 'model')."""
    p = Path(path) / CONFIG_FILE
    if not p.is_file():
        return False
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "model_type" in data


def read_config(path: str | Path) -> dict:
    """config.json of a model directory as a dict (a CheckpointError naming the problem otherwise)."""
    d = Path(path)
    if not d.is_dir():
        raise CheckpointError(f"model directory {d} does not exist")
    p = d / CONFIG_FILE
    data = read_json(p, CheckpointError, missing=f"{d} has no {CONFIG_FILE}: a Hugging Face model directory needs one")
    if not isinstance(data, dict):
        raise CheckpointError(f"{p} must hold a JSON object")
    return data


def weight_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or the shards of an index)."""
    d = Path(path)
    index = d / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index (it needs a 'weight_map'): {e}") from None
        files = {name: d / shard for name, shard in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{d}: shard(s) {', '.join(missing)} named in {INDEX_FILE} are missing")
        return files
    single = d / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(single), framework="pt") as f:
                return {name: single for name in f.keys()}
        except Exception as e:  # the Rust binding raises a bare SafetensorError
            raise CheckpointError(f"{single} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    pickles = [n for n in PICKLE_FILES if (d / n).exists()]
    if pickles:
        raise CheckpointError(f"{d} holds only pickle weights ({', '.join(pickles)}); moekit refuses pickles: convert them to safetensors")
    raise CheckpointError(f"{d} has no {SINGLE_FILE} and no {INDEX_FILE}")


# ---------------------------------------------------------------- dtype and device


def resolve_dtype(dtype: str | torch.dtype | None, hf: dict | None = None) -> torch.dtype:
    """A torch dtype from a name; None = float32, "auto" = the dtype config.json records."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"dtype={dtype} is not supported: use float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        stored = (hf or {}).get("dtype") or (hf or {}).get("torch_dtype") or "float32"
        return DTYPES.get(str(stored), torch.float32)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is unknown: accepted values are float32, bfloat16, float16, auto")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A torch device from a name; None = cpu. An unavailable or malformed device is a ConfigError."""
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError as e:
        raise ConfigError(f"device={device!r} is invalid: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was asked for but CUDA is not available on this machine: use cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device!r} is not supported: use cpu or cuda")
    return dev


# ---------------------------------------------------------------- loading


@torch.no_grad()
def load(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
         kernel: str = "auto", experts: bool = True) -> DecoderLM:
    """A Hugging Face MoE model directory as an eval-mode DecoderLM (float32 on CPU unless told otherwise).

    experts=False (lazy loading): the routed experts are not read and stay on the meta device, for an
    offloading transform to give them fast slots filled from these very files.
    """
    d = Path(path)
    hf = read_config(d)
    cfg = model_config_from_hf(hf, f"{d.name}/{CONFIG_FILE}")
    if kernel != "auto":
        cfg = replace(cfg, moe=replace(cfg.moe, kernel=kernel))
    torch_dtype = resolve_dtype(dtype, hf)
    device = resolve_device(device)
    files = weight_files(d)
    fused = any(n.endswith("experts.gate_up_proj") for n in files)
    plan = expected_names(cfg, family_of(hf), fused, set(files))
    ignored = {n for n in files if n.endswith(IGNORED_SUFFIXES) or (cfg.tie_embeddings and n == "lm_head.weight")}
    ignored |= _ignored_extras(files, cfg, d)
    block = fp8.block_size(hf, f"{d.name}/{CONFIG_FILE}")
    if block is not None:
        ignored |= {fp8.scale_name(n) for n in plan if fp8.scale_name(n) in files}
    _check_names(plan, set(files) - ignored, d)

    skip = None if experts else is_expert_param
    model = _empty_model(cfg, torch_dtype, device, skip)
    _copy_tensors(model, {k: v for k, v in plan.items() if skip is None or v[0] is None or not skip(v[0])}, files, block)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def experts_as_stored(path: str | Path) -> bool:
    """Whether the directory stores every routed expert's weights as moekit holds them (no conversion, no FP8
    blocks), so offloading's disk tier can read them one expert at a time (Engine.load(quantize=...) does)."""
    d = Path(path)
    hf = read_config(d)
    cfg = model_config_from_hf(hf, f"{d.name}/{CONFIG_FILE}")
    files = weight_files(d)
    plan = expected_names(cfg, family_of(hf), any(n.endswith("experts.gate_up_proj") for n in files), set(files))
    if fp8.block_size(hf, f"{d.name}/{CONFIG_FILE}") is not None:
        return False
    return all(len(entry) == 2 for entry in plan.values() if entry[0] is not None and is_expert_param(entry[0]))


def _ignored_extras(files: dict[str, Path], cfg: ModelConfig, d: Path) -> set[str]:
    """DeepSeek-V3's multi-token-prediction layers (index >= num_hidden_layers): not part of the model, skipped with a note."""
    if cfg.attention != "mla":
        return set()
    mtp = mtp_names(files, cfg)
    if mtp:
        warnings.warn(f"{d}: {len(mtp)} multi-token-prediction tensor(s) (model.layers.{cfg.num_layers}.* and beyond) "
                      "are ignored: moekit decodes one token per step", stacklevel=3)
    return mtp


class _File:
    """One safetensors file opened for positional reads (no memory map: the bytes land in memory once)."""

    def __init__(self, path: Path):
        self.path = path
        self.entries, self.start, _ = safetensors_header(path)
        self.size = path.stat().st_size
        self.f = open(path, "rb", buffering=0)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1])

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` in memory of its own."""
        dtype, shape, begin, end = self.entries[name]
        return read_tensor(self.f, dtype, shape, self.start + begin, end - begin, self.size)

    def read_into(self, name: str, target: torch.Tensor) -> None:
        """Copy `name` into `target`: straight from the file when dtype and layout agree, else via one temporary."""
        dtype, _, begin, end = self.entries[name]
        if target.device.type == "cpu" and target.is_contiguous() and SAFETENSORS_DTYPES.get(dtype) == target.dtype:
            read_into(self.f, target, self.start + begin, end - begin, self.size)
        else:
            target.copy_(self.read(name))

    def close(self) -> None:
        self.f.close()


def _read_fp8(f: _File, name: str, files: dict[str, Path], block: tuple[int, int] | None) -> torch.Tensor:
    """The tensor `name`, dequantized when it is FP8 with a block scale beside it (possibly in another shard)."""
    t = f.read(name)
    if block is None or t.dtype not in fp8.FP8_DTYPES:
        return t
    scale = fp8.scale_name(name)
    if scale not in files:
        raise CheckpointError(f"{files[name]}: FP8 tensor {name} has no {scale} beside it")
    return fp8.dequantize(t, _read_companion(files, scale), block, name)


def _is_fp8(f: _File, name: str, block: tuple[int, int] | None) -> bool:
    return block is not None and SAFETENSORS_DTYPES.get(f.entries[name][0]) in fp8.FP8_DTYPES


def _copy_tensors(model: DecoderLM, plan: dict[str, tuple[str, tuple]], files: dict[str, Path],
                  block: tuple[int, int] | None = None) -> None:
    """Each planned tensor read once from its file (positional reads) into its parameter (or buffer) slot."""
    params = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
    by_file: dict[Path, list[str]] = {}
    for name, entry in plan.items():
        if entry[0] is not None:
            by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        f = None
        try:
            f = _File(file)
            for name in names:
                target_name, index, *convert = plan[name]
                target = params[target_name].data[index] if index else params[target_name].data
                if convert:
                    stored = convert[0].load(f.read(name), *(_read_companion(files, c) for c in convert[0].companions))
                    shape = tuple(stored.shape)
                else:
                    shape = f.shape(name)
                if shape != tuple(target.shape):
                    raise CheckpointError(
                        f"{file.name}: tensor {name} has shape {list(shape)} but the config needs {list(target.shape)}"
                        f" (config.json disagrees with the weights)"
                    )
                if convert:
                    target.copy_(stored)
                    del stored  # (a converted layer's tensor goes before the next is read)
                elif _is_fp8(f, name, block):
                    target.copy_(_read_fp8(f, name, files, block))
                else:
                    f.read_into(name, target)
        except MoekitError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None
        finally:
            if f is not None:
                f.close()


def _read_companion(files: dict[str, Path], name: str) -> torch.Tensor:
    f = _File(files[name])
    try:
        return f.read(name)
    finally:
        f.close()


def _check_names(plan: dict, present: set[str], d: Path) -> None:
    missing = sorted(set(plan) - present)
    if missing:
        raise CheckpointError(
            f"{d}: {len(missing)} tensor(s) the config needs are missing from the weights, e.g. {', '.join(missing[:3])}"
        )
    extra = sorted(present - set(plan))
    if extra:
        raise CheckpointError(
            f"{d}: {len(extra)} tensor(s) in the weights do not fit the config (config.json disagrees with the weights), "
            f"e.g. {', '.join(extra[:3])}"
        )


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, skip=None) -> DecoderLM:
    """A DecoderLM allocated once, uninitialised, in its final dtype and device; buffers recomputed.

    Parameters for which skip(name) is True stay on the meta device (in the final dtype), unallocated.
    """
    model = meta_decoder(cfg).to(dtype)
    made: dict[int, nn.Parameter] = {}  # (a tied weight is allocated once)
    for module_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None or (skip is not None and skip(f"{module_name}.{name}" if module_name else name)):
                continue
            if id(p) not in made:  # torch.empty, not empty_like/to_empty: from meta those import sympy (~35 MB)
                made[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
            module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = b.to(device)
    real_buffers(model, device)
    return model


# ---------------------------------------------------------------- files beside the weights


def load_tokenizer(path: str | Path):
    """The directory's tokenizer.json as a moekit Tokenizer, or None when there is none."""
    from ..data.text import Tokenizer

    p = Path(path) / "tokenizer.json"
    return Tokenizer.from_file(p) if p.is_file() else None


def tokenizer_config(path: str | Path) -> dict:
    """tokenizer_config.json of a model directory as a dict ({} when absent or not an object)."""
    p = Path(path) / TOKENIZER_CONFIG_FILE
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def stored_eos_token_id(path: str | Path) -> int | list[int] | None:
    """The `eos_token_id` entry as stored: generation_config.json first, then config.json; None when neither has one.

    Unreadable files count as having none (generation falls back to the tokenizer's EOS).
    """
    d = Path(path)
    for name in (GENERATION_CONFIG_FILE, CONFIG_FILE):
        p = d / name
        if p.is_file():
            try:
                eos = json.loads(p.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError):
                eos = None
            if eos is not None:
                return eos
    return None
