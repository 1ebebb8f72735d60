"""The training loop shared by every moekit model.

`fit` is model-agnostic: it takes a model, a `batch_fn(step)` that is a pure
function of the step (so a resume needs no data-loader state), and a
`loss_fn(model, batch) -> (loss, metrics)`. It brings AdamW, warmup + cosine,
clipping, accumulation, optional bf16 autocast and torch.compile, the device
(`train.device`: the model and every batch move there; autocast follows the
parameters' device; under expert parallelism with NCCL each rank takes
cuda:LOCAL_RANK), a progress bar, metrics as JSONL, atomic checkpoints that resume bit for bit, and a
Ctrl-C that saves before it exits.

One process or many run the same code: without expert parallelism the loop
holds a `moekit.parallel.SingleProcess`, whose batch, gradient and state calls
are identities. Not here: the recipes that call `fit` (recipes.py: one per
`data.kind`, e.g. lm.py's text recipe, multitask.py's math tasks, forecaster.py).
"""

from __future__ import annotations

import base64
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import checkpoint_name, load_checkpoint, resolve_checkpoint, save_checkpoint
from ..config import _check_choice, _check_int, from_dict, to_dict
from ..errors import CheckpointError, ConfigError
from ..moe.balance import install_bias_balancing
from ..parallel.training import SingleProcess


DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    eval_every: int = 50  # 0: only at the end
    eval_batches: int = 8
    save_every: int = 100  # 0: only at the end
    keep_last: int = 3
    log_every: int = 1
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_last", "log_every"):
            _check_int(self, name, 1)
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            _check_int(self, name, 0)
        _check_choice(self, "precision", ("fp32", "bf16"))
        _check_choice(self, "device", DEVICES)
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} is invalid: it must be > 0")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def resolve_device(name: str, parallel: Any = None) -> torch.device:
    """The device `train.device` names: auto is CUDA when available, else the CPU.

    Under expert parallelism a CUDA device is this rank's own GPU
    (cuda:LOCAL_RANK, which the NCCL process group was set up on); a
    gloo-only run (no NCCL) trains on the CPU.
    """
    if name not in DEVICES:
        raise ConfigError(f"train.device={name!r} is unknown: accepted values are {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    if name == "cuda" and not cuda:
        raise ConfigError("train.device='cuda' but no CUDA device is available (torch.cuda.is_available() is False): "
                          "use train.device=cpu or train.device=auto")
    if name == "cpu" or not cuda:
        return torch.device("cpu")
    parallel = parallel if parallel is not None else SingleProcess()
    if parallel.device.type != "cuda":
        if name == "cuda":
            raise ConfigError("train.device='cuda' under expert parallelism needs the NCCL backend, but this run's "
                              "process group has none (gloo only): use train.device=cpu or start it with NCCL")
        return torch.device("cpu")
    return parallel.device


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a batch (tensors, tuples, lists, dicts; other values kept) on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases) do not.

    The fused kernel (one pass per tensor, CPU or CUDA) where every parameter
    allows it: an MoE's optimizer step touches all experts' weights, so it is a
    larger share of the step than a dense model's (moe16_top1 of
    benchmarks/deepspeed_moe.py: 1.11x faster steps than foreach=False, dense
    unchanged). Deterministic either way, so resume stays bitwise.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    kind = {"fused": True} if fused else {"foreach": False}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kind)


@dataclass
class FitResult:
    step: int
    interrupted: bool
    checkpoint: Path | None  # the latest: a resumed run's is the one it resumed from until it saves (a finished run saves none)
    last_metrics: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    start_step: int = 0  # the step this call began at (> 0 when it resumed a run)


class _StopRequest:
    """Turns the first Ctrl-C into a flag checked between steps; a second one interrupts."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def fit(
    model: torch.nn.Module,
    cfg: TrainConfig,
    *,
    batch_fn: Callable[[int], Any],
    loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]],
    run_dir: str | Path,
    config_dict: dict,
    eval_fn: Callable[[torch.nn.Module, int], dict[str, float]] | None = None,
    tokenizer: Any = None,
    resume: bool = False,
    progress: bool = True,
    tokens_per_batch: int | None = None,
    parallel: Any = None,
) -> FitResult:
    """Train `model` for cfg.steps optimizer steps; see the module docstring.

    `parallel`: a `moekit.parallel.ExpertParallel` for a model already passed
    through `apply_expert_parallel`. Each rank then takes its slice of every
    batch, gradients are reduced over the ranks, and rank 0 alone writes the
    log and the (gathered, layout-free) checkpoints; eval_fn runs on every rank. None: `SingleProcess()`.
    """
    parallel = parallel if parallel is not None else SingleProcess()
    run, main = Path(run_dir), parallel.is_main
    torch.manual_seed(cfg.seed)
    model.to(resolve_device(cfg.device, parallel))
    optimizer = make_optimizer(model, cfg)
    install_bias_balancing(model, optimizer, parallel)  # aux-loss-free bias: updated before each optimizer step
    step = _resume(model, optimizer, run, parallel) if resume else 0
    if main:
        run.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(run / "metrics.jsonl", step)
    forward_model = torch.compile(model) if cfg.compile else model
    result = FitResult(step=step, interrupted=False, checkpoint=resolve_checkpoint(run) if resume else None, start_step=step)
    save = _Saver(run, model, optimizer, cfg, config_dict, tokenizer, parallel)
    bar, stopping = _progress_bar(cfg.steps, step, progress and main), False
    with _StopRequest() as stop, open(run / "metrics.jsonl" if main else os.devnull, "a") as log:
        # with several ranks a Ctrl-C seen by any of them stops all of them at the same step
        while step < cfg.steps and not (stopping := parallel.any_rank(stop.requested)):
            t0 = time.perf_counter()
            metrics = _train_step(forward_model, model, optimizer, cfg, step, batch_fn, loss_fn, parallel)
            step += 1
            metrics.update(step=step, lr=lr_at(step - 1, cfg), seconds=time.perf_counter() - t0)
            if tokens_per_batch:
                metrics["tokens_per_s"] = tokens_per_batch * cfg.grad_accum / metrics["seconds"]
            result.last_metrics = metrics
            _log(log, metrics)
            bar.update(1)
            bar.set_postfix(_postfix(metrics), refresh=False)
            at_end = step == cfg.steps
            if eval_fn is not None and (at_end or (cfg.eval_every and step % cfg.eval_every == 0)):
                result.last_eval = _evaluate(model, eval_fn, step, log, bar if main else None)
            if at_end or (cfg.save_every and step % cfg.save_every == 0):
                result.checkpoint = save(step)
        if stopping and step < cfg.steps:
            result.interrupted = True
            result.checkpoint = save(step)
    bar.close()
    result.step = step
    return result


def _evaluate(model, eval_fn, step: int, log, bar) -> dict:
    """eval_fn in eval mode without gradients; logged, and printed under the progress bar on the main rank."""
    model.eval()
    with torch.no_grad():
        metrics = {"step": step, **eval_fn(model, step)}
    model.train()
    _log(log, metrics)
    if bar is not None:
        bar.write(_eval_line(metrics))
    return metrics


_CPU = torch.device("cpu")


class _Saver:
    """Writes the step's checkpoint (with an expert-parallel model, every rank gathers and rank 0 writes)."""

    def __init__(self, run, model, optimizer, cfg, config_dict, tokenizer, parallel):
        self.run, self.model, self.optimizer, self.cfg = run, model, optimizer, cfg
        self.config_dict, self.tokenizer, self.parallel = config_dict, tokenizer, parallel

    def __call__(self, step: int) -> Path:
        state = {"step": step, "rng": _rng_state(), "config": to_dict(self.cfg)}
        device = next(self.model.parameters()).device
        if device.type == "cuda":
            state["cuda_rng"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
        parallel = self.parallel  # every rank takes part in gathering the experts; rank 0 writes
        model_state = parallel.full_state_dict(self.model)
        optimizer_state = parallel.full_optimizer_state(self.model, self.optimizer)
        if not parallel.is_main:
            return self.run / checkpoint_name(step)
        if device.type != "cpu":  # checkpoints hold CPU tensors, whatever the training device
            model_state, optimizer_state = to_device(model_state, _CPU), to_device(optimizer_state, _CPU)
        return save_checkpoint(
            self.run, step, config=self.config_dict, model_state=model_state, optimizer_state=optimizer_state,
            trainer_state=state, tokenizer=self.tokenizer, keep_last=self.cfg.keep_last,
        )


def _train_step(forward_model, model, optimizer, cfg, step, batch_fn, loss_fn, parallel) -> dict:
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    totals: dict[str, float] = {}
    device = next(model.parameters()).device  # autocast follows the parameters, not what the machine has
    for micro in range(cfg.grad_accum):
        batch = batch_fn(step * cfg.grad_accum + micro)
        batch = to_device(parallel.shard_batch(batch), device)
        with torch.autocast(device.type, torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss, metrics = loss_fn(forward_model, batch)
        (loss / cfg.grad_accum).backward()
        for name, value in {"loss": float(loss.detach()), **metrics}.items():
            totals[name] = totals.get(name, 0.0) + value / cfg.grad_accum
    parallel.reduce_gradients(model)
    totals = parallel.mean_metrics(totals)
    if cfg.grad_clip > 0:
        totals["grad_norm"] = float(parallel.clip_grad_norm_(model, cfg.grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals


def _resume(model, optimizer, run: Path, parallel) -> int:
    ckpt = load_checkpoint(resolve_checkpoint(run))
    parallel.load_model_state(model, ckpt.model_state)  # checkpoints hold every expert; a shard keeps its own
    if ckpt.optimizer_state is None:
        raise CheckpointError(f"checkpoint {ckpt.dir} has no optimizer state, so training cannot resume from it")
    parallel.load_optimizer_state(model, optimizer, ckpt.optimizer_state)
    state = ckpt.trainer_state
    if "rng" in state:
        torch.set_rng_state(_bytes_tensor(state["rng"]))
    device = next(model.parameters()).device
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda_rng"]), device)
    return int(state.get("step", 0))


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged lines past `step`: a killed run may have logged steps its last checkpoint lacks."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _log(log, metrics: dict) -> None:
    log.write(json.dumps(metrics) + "\n")
    log.flush()


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def _postfix(m: dict) -> dict:
    keys = {"loss": "loss", "tokens_per_s": "tok/s", "balance": "aux", "max_over_mean_load": "load"}
    return {short: f"{m[k]:.3g}" if k != "tokens_per_s" else f"{m[k]:.0f}" for k, short in keys.items() if k in m}


def _eval_line(e: dict) -> str:
    return "eval " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in e.items())


def train_config_from(data: dict) -> TrainConfig:
    return from_dict(TrainConfig, data, "train")
