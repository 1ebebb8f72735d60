"""One loader for every model format: `load(path, ...)` -> a `Loaded` record that `Engine` takes.

Formats (`model_format` names them): a Hugging Face model directory (moekit.hf), a moekit run or
checkpoint directory (moekit.models.build.load_model: a checkpoint written by `moekit quantize` comes
back quantized, a pre-gated one with its routing applied), a GGUF file (moekit.gguf, its block formats
kept) and a moefy output (moekit.moefy.io: a converted decoder; a Read-ME model routes ahead).

Every option applies to every format: dtype, device, quantize ("int8" | "int4" at load time), and an
expert budget with the offloading options (tier, policy, predictor, low_bit_fallback, ...). Where the
experts live is decided once, by `offload_plan`: the slow tier defaults to pinned host memory on CUDA
and to the checkpoint's own files (disk) elsewhere, and only the disk tier loads lazily (the routed
experts are never read into memory; they go from the file straight into fast slots). Every other tier
loads the model whole, then offloads it. The record also carries what generation needs beside the
model: tokenizer, stop ids, chat template, and the task names of a multi-task (data.kind=math_tasks)
run, whose task ids are the routers' group ids.

Not here: generation (engine.py), the offloading machinery (offload/), the command-line flags
(moekit.cli.loading_flags), the format readers themselves (moekit.hf, moekit.gguf, moekit.moefy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..models.decoder import DecoderLM

FORMATS = ("hf", "moekit", "gguf", "moefy")


@dataclass
class Loaded:
    """A loaded model and what generation needs beside it (Engine(loaded) takes it as it is)."""

    model: DecoderLM
    tokenizer: object = None
    stop_token_ids: list[int] | None = None  # None: the tokenizer's end-of-sequence id
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    chat_fallback: bool = False  # chat without a template in the server's fallback format (moekit checkpoints)
    path: Path | None = None  # where it was loaded from (offloading's disk tier reads it)
    format: str = ""  # one of FORMATS
    tasks: tuple[str, ...] = ()  # a data.kind=math_tasks run's task names; a task's group id is its index
    offloader: object = None  # the Offloader when loaded with an expert budget


def default_tier(device) -> str:
    """The slow tier of offloaded experts when none is named: pinned host memory on CUDA, else the model's files."""
    return "cuda-host" if device is not None and str(device).startswith("cuda") else "disk"


def offload_plan(device, expert_budget, tier=None, lazy: bool | None = None) -> tuple[object, bool]:
    """(the slow tier, whether to load lazily) for an expert budget on `device`; (None, False) without a budget.

    The one decision `load`, `moekit generate` and `moekit serve` share. lazy=None (the commands): the tier
    named, else `default_tier(device)`, and lazily (the routed experts never read into memory) exactly when
    that tier is the model's own files ("disk"). lazy=True (Engine.load's meaning): the tier defaults to
    "disk", the only one a lazily loaded model can use (offloading refuses any other).
    """
    if expert_budget is None:
        return None, False
    if tier is None:
        tier = "disk" if lazy else default_tier(device)
    return tier, (isinstance(tier, str) and tier == "disk") if lazy is None else bool(lazy)


def model_format(path: str | Path) -> str:
    """Which of FORMATS `path` holds (a file is taken as GGUF; a directory that is none of the others as a moekit run)."""
    from .. import hf

    p = Path(path)
    if p.suffix == ".gguf" or p.is_file():
        return "gguf"
    from ..moefy.io import is_moefy_dir

    if is_moefy_dir(p):
        return "moefy"
    return "hf" if hf.is_hf_dir(p) else "moekit"


def load(path: str | Path, dtype=None, device=None, quantize: str | None = None, expert_budget=None,
         lazy: bool | None = None, **offload_options) -> Loaded:
    """Load a model of any format (see FORMATS) for generation.

    dtype / device: as moekit.hf.load takes them (None: float32 on the CPU). quantize="int8" | "int4"
    (group 32, symmetric) quantizes the experts at load time (moekit.quantize.quantize_model); a
    checkpoint written by `moekit quantize` comes back quantized without it. With an expert budget too,
    each expert is quantized as it is read, so they never all exist in full precision. A GGUF file runs
    in its own block formats (with quantize= it is dequantized, then requantized to moekit's format).
    expert_budget ("25%", 0.25, "2GB", bytes; None = all resident) offloads the experts
    (moekit.infer.offload.offload_model takes `offload_options`: tier, policy, predictor, pregate,
    low_bit_fallback, link_bandwidth, spill_dir, ...); `offload_plan` picks the tier and laziness
    (lazy=True: the experts are never read into memory, whatever the device; lazy=False: loaded, then offloaded).
    """
    options = None
    if quantize is not None:  # (moekit.quantize brings numba: 0.5 s and ~90 MB, only when asked for)
        from ..quantize import load_time_options

        options = load_time_options(quantize)  # a bad name is refused before anything is read
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"model path {p} does not exist: give a Hugging Face model directory, a moekit run or "
                          f"checkpoint, a GGUF file or a moefy output")
    if offload_options and expert_budget is None:
        raise ConfigError(f"{', '.join(sorted(offload_options))} only apply with an expert budget (expert_budget=...)")
    if lazy is not None and expert_budget is None:
        raise ConfigError("lazy loading only applies with an expert budget (expert_budget=...)")
    tier, lazy = offload_plan(device, expert_budget, offload_options.pop("tier", None), lazy)
    fmt = model_format(p)
    loaded = _READERS[fmt](p, dtype, device, options, lazy)
    loaded.path, loaded.format = p, fmt
    if expert_budget is not None:
        from .offload import offload_model

        offload_options.setdefault("checkpoint", p)
        loaded.offloader = offload_model(loaded.model, expert_budget, tier=tier, **offload_options)
    return loaded


# ---------------------------------------------------------------- one reader per format


def _read_hf(p: Path, dtype, device, options: dict | None, lazy: bool) -> Loaded:
    from .. import hf
    from ..hf.reader import experts_as_stored
    from .chat import load_chat_template, special_tokens, stop_token_ids

    per_expert = options is not None and not lazy and experts_as_stored(p)
    model = _load_quantized(lambda experts: hf.load(p, dtype=dtype, device=device, experts=experts), p, options,
                            lazy, per_expert)
    tokenizer = hf.load_tokenizer(p)
    return Loaded(model, tokenizer, stop_token_ids(p, tokenizer), load_chat_template(p), special_tokens(p))


def _read_moekit(p: Path, dtype, device, options: dict | None, lazy: bool) -> Loaded:
    """A moekit run or checkpoint (quantized or pre-gated ones too); no chat template: chat as the server does."""
    from .. import hf
    from ..models.build import load_model

    read = []

    def load_it(experts: bool) -> DecoderLM:
        model, tokenizer, config = load_model(p, experts=experts)  # a pre-gated model comes back with its routing applied
        place(model, hf.resolve_device(device), hf.resolve_dtype(dtype))
        read.append((tokenizer, config))
        return model

    model = _load_quantized(load_it, p, options, lazy)
    tokenizer, config = read[-1]
    return Loaded(model, tokenizer, chat_fallback=True, tasks=run_tasks(config))


def run_tasks(config: dict) -> tuple[str, ...]:
    """The task names of a data.kind=math_tasks run's config dict (a task's group id is its index), else ()."""
    data = config.get("data") or {}
    if data.get("kind") != "math_tasks":
        return ()
    from ..data.mathtasks import TASKS

    return tuple((data.get("math") or {}).get("tasks") or TASKS)


def _read_moefy(p: Path, dtype, device, options: dict | None, lazy: bool) -> Loaded:
    """A directory written by `moekit moefy` (a converted decoder; experts left on meta when lazy)."""
    from .. import hf
    from ..moefy.io import load_generator
    from .chat import load_chat_template, special_tokens, stop_token_ids

    model, tokenizer = load_generator(p, experts=not lazy)
    place(model, hf.resolve_device(device), hf.resolve_dtype(dtype))
    return Loaded(_quantized(model, options), tokenizer, stop_token_ids(p, tokenizer), load_chat_template(p),
                  special_tokens(p))


def _read_gguf(p: Path, dtype, device, options: dict | None, lazy: bool) -> Loaded:
    """A GGUF file: its blocks kept as they are (experts too unless lazy), other tensors as floats.

    quantize=: everything dequantized instead, and without a budget the experts requantized one at a time
    (no full-precision copy of them)."""
    from .. import gguf

    if not gguf.is_gguf(p):
        raise ConfigError(f"model path {p} is a file but not a GGUF file: give a .gguf file, a Hugging Face model "
                          f"directory or a moekit checkpoint")
    per_expert = lazy or options is not None  # requantized: each expert dequantized, then quantized, as it is read
    model = _quantized(gguf.load(p, dtype=dtype, device=device, experts=not per_expert, blocks=options is None), options)
    if per_expert and not lazy:
        from .offload.transform import load_experts

        load_experts(model, p)
    return Loaded(model, gguf.load_tokenizer(p))


_READERS = {"hf": _read_hf, "moekit": _read_moekit, "gguf": _read_gguf, "moefy": _read_moefy}


# ---------------------------------------------------------------- quantizing and placing at load time


def _quantized(model: DecoderLM, options: dict | None) -> DecoderLM:
    """The model quantized at load time (options for moekit.quantize.quantize_model), or as it is."""
    if options is None:
        return model
    from ..quantize import quantize_model

    return quantize_model(model, **options)


def _load_quantized(read: Callable[[bool], DecoderLM], path: Path, options: dict | None, lazy: bool,
                    per_expert: bool = True) -> DecoderLM:
    """`read(experts)`'s model, quantized at load time by `options` (None: as loaded).

    Resident (not lazy) with options: the model is loaded without its routed experts, quantized (on the
    meta device), then its experts are read one at a time and each quantized as it is read (offloading's
    `load_experts`), so no full-precision copy of all experts ever exists. Experts the disk tier cannot
    read as stored (FP8 blocks, MXFP4 or transposed tensors: per_expert=False from the caller, or an
    OffloadError as the backstop): the whole model is loaded, then quantized.
    """
    if options is None or lazy or not per_expert:
        return _quantized(read(not lazy), options)
    from .offload import OffloadError
    from .offload.transform import load_experts

    model = _quantized(read(False), options)
    try:
        load_experts(model, path)
    except OffloadError:
        del model
        return _quantized(read(True), options)
    return model


def place(model, device: torch.device, dtype: torch.dtype) -> None:
    """Parameters to `device` and `dtype` (buffers stay: the rotary table is float32); meta ones change dtype only."""
    for param in model.parameters():
        if param.is_meta:
            param.data = torch.empty_like(param, dtype=dtype)
        else:
            param.data = param.data.to(device=device, dtype=dtype)
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:  # (a lazily loaded quantized checkpoint's experts stay on meta)
                module._buffers[name] = buf.to(device)


__all__ = ["Loaded", "load", "model_format", "offload_plan", "default_tier", "run_tasks", "FORMATS"]
