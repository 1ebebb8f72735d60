"""Checkpoints as safetensors + JSON: atomic saves, pruning, resume, strict loading.

A run directory holds checkpoint directories and a `latest` file naming the newest:

    run_dir/
      latest                    "step-00000200"
      step-00000100/ ...
      step-00000200/
        config.json             the resolved config, enough to rebuild the model
        model.safetensors       model weights (tied tensors stored once, aliases in the metadata)
        optimizer.safetensors   optional: optimizer state as flat tensors + JSON skeleton
        trainer_state.json      step, data position, metrics ... (whatever the trainer passes)
        tokenizer.json          when a tokenizer is given

A save is written into a hidden temporary directory inside the run directory,
fsynced, then renamed into place, so a crash never leaves a half-written
checkpoint; `latest` is replaced atomically afterwards. Pickle files are never
read. Only one process (rank 0) writes a run directory.

Not here: what goes into trainer_state (moekit.train), Hugging Face checkpoint
layouts and sharded files (moekit.hf).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import torch as safetensors_torch

from .errors import CheckpointError, ConfigError
from .fileio import TMP_PREFIX, atomic_directory, fsync_dir, honour_umask, read_json

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "config.json"
MOEFY_MANIFEST = "moefy.json"  # what a moefy output holds instead (moekit.moefy.io.MANIFEST): named in refusals
TRAINER_STATE_FILE = "trainer_state.json"
TOKENIZER_FILE = "tokenizer.json"
LATEST_FILE = "latest"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
STEP_DIR = re.compile(r"^step-(\d{8,})$")
ALIASES_KEY = "moekit.aliases"  # safetensors metadata: {alias name: stored name}
SKELETON_KEY = "moekit.state"  # safetensors metadata: JSON skeleton of a nested state


@dataclass
class Checkpoint:
    """One loaded checkpoint directory."""

    dir: Path
    config: dict
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None
    trainer_state: dict = field(default_factory=dict)
    tokenizer_path: Path | None = None  # dir/tokenizer.json when it was saved


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------- saving


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    config: dict,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    trainer_state: dict,
    tokenizer: Any = None,
    keep_last: int | None = 3,
) -> Path:
    """Atomically write run_dir/step-XXXXXXXX, point `latest` at it, prune to `keep_last`; return its path."""
    if not isinstance(step, int) or step < 0:
        raise ConfigError(f"step={step!r} is invalid: it must be an integer >= 0")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ConfigError(f"keep_last={keep_last!r} is invalid: it must be an integer >= 1, or None to keep all")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    final = run / checkpoint_name(step)
    with atomic_directory(final, fsync=True, move=_move_into_place) as tmp:
        _write_contents(tmp, config, model_state, optimizer_state, trainer_state, tokenizer)
    _write_latest(run, final.name)
    _prune(run, keep_last, keep=final.name)
    return final


def _write_contents(
    directory: Path,
    config: dict,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict | None,
    trainer_state: dict,
    tokenizer: Any,
) -> None:
    _write_json(directory / CONFIG_FILE, config)
    save_tensors(directory / MODEL_FILE, model_state)
    if optimizer_state is not None:
        tensors, skeleton = state_to_tensors(optimizer_state)
        save_tensors(directory / OPTIMIZER_FILE, tensors, {SKELETON_KEY: json.dumps(skeleton)})
    _write_json(directory / TRAINER_STATE_FILE, trainer_state)
    if tokenizer is not None:
        tokenizer.save(directory)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an existing checkpoint of the same step is swapped out, then removed."""
    if not final.exists():
        os.rename(tmp, final)
    else:
        old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-", dir=final.parent))
        os.replace(final, old / final.name)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)


def _write_latest(run: Path, name: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}latest-", dir=run)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        honour_umask(tmp_name)
        os.replace(tmp_name, run / LATEST_FILE)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(run)


def _prune(run: Path, keep_last: int | None, keep: str) -> None:
    """Delete the oldest step directories beyond keep_last (never `keep`) and stale temporaries."""
    for stale in run.glob(f"{TMP_PREFIX}*"):
        # Leftovers of a crashed save: only one process writes a run directory, so none is in use.
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    if keep_last is None:
        return
    steps = sorted(_step_dirs(run), key=lambda p: _step_of(p))
    for old in [p for p in steps if p.name != keep][: max(0, len(steps) - keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def _step_dirs(run: Path) -> list[Path]:
    return [p for p in run.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]


def _step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- tensors files


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file; tensors sharing memory (tied weights) are stored once and aliased."""
    stored, aliases = _dedupe(tensors)
    meta = dict(metadata or {})
    meta["format"] = "pt"
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases)
    # Looked up at call time (not imported by name) so tests can inject a failing writer.
    safetensors_torch.save_file(stored, str(path), metadata=meta)
    honour_umask(path)  # safetensors writes 0600


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to store, {alias: stored name}); identical views become aliases, partial overlaps copies."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state entry {name!r} is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach()
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and view in by_view:
            aliases[name] = by_view[view]
            continue
        shares_memory = t.numel() > 0 and storage in storages
        stored[name] = t.clone().contiguous().cpu() if shares_memory else t.contiguous().cpu()
        if t.numel():
            by_view[view] = name
            storages.add(storage)
    return stored, aliases


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def safetensors_header(path: str | Path) -> tuple[dict[str, tuple[str, list[int], int, int]], int, dict[str, str]]:
    """({name: (dtype, shape, begin, end)}, data start, metadata) without reading tensor data; ValueError if malformed."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than 8 bytes")
        (length,) = struct.unpack("<Q", raw)
        if length > 100_000_000:
            raise ValueError(f"header length {length} is implausible")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    entries = {name: (v["dtype"], list(v["shape"]), int(v["data_offsets"][0]), int(v["data_offsets"][1]))
               for name, v in header.items()}
    return entries, 8 + length, metadata


def load_tensors(path: str | Path, skip: Callable[[str], bool] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors with aliases restored, metadata) from a safetensors file; CheckpointError if unreadable.

    Each tensor is read with positional reads into memory of its own (no memory map stays behind, so a
    file replaced or truncated later cannot touch a loaded model, and the bytes are in memory once).
    Names for which skip(name) is True are not read.
    """
    p = Path(path)
    try:
        entries, start, metadata = safetensors_header(p)
        size = p.stat().st_size
        tensors = {}
        with open(p, "rb", buffering=0) as f:
            for name, (dtype, shape, begin, end) in entries.items():
                if skip is not None and skip(name):
                    continue
                tensors[name] = read_tensor(f, dtype, shape, start + begin, end - begin, size)
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    for alias, target in json.loads(metadata.get(ALIASES_KEY, "{}")).items():
        if target in tensors:
            tensors[alias] = tensors[target]
    return tensors, metadata


def read_tensor(f, dtype: str, shape: list[int], offset: int, nbytes: int, file_size: int) -> torch.Tensor:
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported")
    out = torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype])
    read_into(f, out, offset, nbytes, file_size)
    return out


def read_into(f, out: torch.Tensor, offset: int, nbytes: int, file_size: int) -> None:
    """Fill the contiguous CPU tensor `out` with the file's bytes offset..offset+nbytes (positional reads, no memory map)."""
    if out.numel() * out.element_size() != nbytes or offset + nbytes > file_size:
        raise ValueError(f"a tensor's byte range {offset}..{offset + nbytes} does not fit its shape or the file")
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if nbytes else memoryview(b"")
    done = 0
    while done < nbytes:
        n = os.preadv(f.fileno(), [view[done:]], offset + done)
        if n <= 0:
            raise ValueError(f"the file ended at byte {offset + done}")
        done += n


# ---------------------------------------------------------------- nested state <-> flat tensors


def state_to_tensors(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (e.g. an optimizer state_dict) into flat named tensors and a JSON skeleton.

    The skeleton keeps everything else exactly: tuples, non-string dict keys (the
    optimizer's integer parameter ids), None, bools, ints and floats.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            name = path if path not in tensors else f"{path}#{len(tensors)}"
            tensors[name] = x
            return {"__tensor__": name}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not _reserved(k) for k in x):
                return {k: encode(v, f"{path}.{k}" if path else k) for k, v in x.items()}
            return {"__dict__": [[_check_key(k, path), encode(v, f"{path}.{k}" if path else str(k))] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [encode(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} at {path or 'the top level'} in a checkpoint")

    return tensors, encode(state, "")


def state_from_tensors(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of `state_to_tensors`."""

    def decode(x: Any) -> Any:
        if isinstance(x, list):
            return [decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            name = x["__tensor__"]
            if name not in tensors:
                raise CheckpointError(f"state tensor {name!r} is missing from the optimizer file")
            return tensors[name]
        if "__tuple__" in x:
            return tuple(decode(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {k: decode(v) for k, v in x["__dict__"]}
        return {k: decode(v) for k, v in x.items()}

    return decode(skeleton)


def _reserved(key: str) -> bool:
    return key in ("__tensor__", "__tuple__", "__dict__")


def _check_key(key: Any, path: str) -> Any:
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    raise TypeError(f"cannot store a dict key of type {type(key).__name__} at {path or 'the top level'}")


# ---------------------------------------------------------------- loading


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory for a run directory (follows `latest`) or a checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist")
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise _pickle_refused(p)
        if p.name == MODEL_FILE or p.name == LATEST_FILE:
            return resolve_checkpoint(p.parent)
        if _is_gguf(p):
            raise CheckpointError(f"{p} is a GGUF file: this command takes moekit runs and checkpoints; GGUF files run in "
                                  "`moekit generate` and `moekit serve` (and Engine.load)")
        raise CheckpointError(f"{p} is a file: give a run directory or a checkpoint directory (holding {MODEL_FILE})")
    if (p / MODEL_FILE).is_file():
        return p
    if (p / LATEST_FILE).is_file():
        return _follow_latest(p)
    steps = _step_dirs(p)
    if steps:
        # `latest` can be missing if a run was copied partially; the highest step is the best guess.
        return max(steps, key=_step_of)
    pickles = [q.name for q in p.iterdir() if q.is_file() and q.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise _pickle_refused(p / pickles[0])
    if (p / CONFIG_FILE).is_file() and "model_type" in (p / CONFIG_FILE).read_text(errors="replace"):
        raise CheckpointError(f"{p} is a Hugging Face model directory, not a moekit run or checkpoint: it runs in "
                              "`moekit generate` and `moekit serve` (and Engine.load); `moekit quantize` and "
                              "`moekit moefy` take it too")
    raise CheckpointError(
        f"{p} is neither a checkpoint directory (holding {MODEL_FILE}) nor a run directory (holding a {LATEST_FILE} file)"
    )


def _is_gguf(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def _follow_latest(run: Path) -> Path:
    name = (run / LATEST_FILE).read_text().strip()
    target = run / name
    if not name or "/" in name or "\\" in name or not (target / MODEL_FILE).is_file():
        raise CheckpointError(f"{run / LATEST_FILE} names {name!r}, which is not a checkpoint directory in {run}")
    return target


def _pickle_refused(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is a pickle file; moekit refuses to load pickle (it can run arbitrary code): "
        f"convert the weights to safetensors ({MODEL_FILE})"
    )


def load_checkpoint(path: str | Path, optimizer: bool = True, skip: Callable[[str], bool] | None = None) -> Checkpoint:
    """Load config, model (and optimizer) state and trainer state from a run or checkpoint directory.

    optimizer=False leaves the optimizer state unread (inference); `skip(name)` True leaves that model tensor
    unread (lazy loading reads the experts later, straight into their fast slots).
    """
    directory = resolve_checkpoint(path)
    if not (directory / CONFIG_FILE).is_file() and (directory / MOEFY_MANIFEST).is_file():
        raise CheckpointError(f"{directory} is a moefy output (a converted model, {MOEFY_MANIFEST}), not a moekit run or "
                              "checkpoint: moefy outputs run in `moekit generate`, `moekit serve` and Engine.load; this "
                              "command takes moekit runs and checkpoints")
    config = _read_json(directory / CONFIG_FILE, required=True)
    model_state, _ = load_tensors(directory / MODEL_FILE, skip)
    optimizer_state = None
    if optimizer and (directory / OPTIMIZER_FILE).is_file():
        tensors, metadata = load_tensors(directory / OPTIMIZER_FILE)
        if SKELETON_KEY not in metadata:
            raise CheckpointError(f"{directory / OPTIMIZER_FILE} lacks its state layout ({SKELETON_KEY} metadata)")
        optimizer_state = state_from_tensors(tensors, json.loads(metadata[SKELETON_KEY]))
    trainer_state = _read_json(directory / TRAINER_STATE_FILE, required=False) or {}
    tokenizer = directory / TOKENIZER_FILE
    return Checkpoint(
        dir=directory,
        config=config,
        model_state=model_state,
        optimizer_state=optimizer_state,
        trainer_state=trainer_state,
        tokenizer_path=tokenizer if tokenizer.is_file() else None,
    )


def _read_json(path: Path, required: bool) -> Any:
    missing = f"{path} is missing: a checkpoint directory needs {path.name}" if required else None
    return read_json(path, CheckpointError, missing, invalid=f"{path} is not valid JSON (truncated or corrupt?)")


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strictly load `state` into `model`; any name or shape mismatch is a CheckpointError naming it."""
    check_state(model, state)
    model.load_state_dict(state, strict=True)


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], skip: Callable[[str], bool] | None = None) -> None:
    """Every name of the model's state in `state` and no other, each with the model's shape; else a CheckpointError.

    Names for which skip(name) is True are neither needed nor checked.
    """
    expected = {k: v for k, v in model.state_dict().items() if skip is None or not skip(k)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_names(missing)}")
        if unexpected:
            parts.append(f"not in the model: {_names(unexpected)}")
        raise CheckpointError("checkpoint does not match the model; " + "; ".join(parts))
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(state[name].shape)} in the checkpoint "
                f"but {tuple(tensor.shape)} in the model (was the checkpoint saved with another config?)"
            )


def _names(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
