"""The Time-MoE training recipe: pre-train or fine-tune a forecaster on the train splits of CSVs.

Holds `train_forecaster` (the one call behind `moekit train-forecaster`),
Time-MoE's optimiser settings at CPU scale (`default_train_config`), the data
settings of a run (`ForecastDataConfig`: mixture, date format, columns), the
per-window normalisation of training sequences, the stop on a loss that is not
finite (`TrainingDiverged`), and reading a saved run back for `--resume`. The generic loop, checkpoints and metrics are `moekit.train.loop`'s.

Not here: the model (`moekit.models.timemoe`), the Hugging Face format and
`load_forecaster` (`moekit.hf.timemoe`), forecasting and evaluation
(`moekit.infer.forecast`, `moekit.infer.forecast_eval`).

Shape suffixes: B batch, W window (seq_len + 1 points).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import apply_overrides, from_dict, to_dict
from ..errors import CheckpointError, ConfigError, MoekitError
from ..hf.timemoe import load_forecaster
from ..models.timemoe import (
    MODEL_TYPE,
    ForecasterConfig,
    TimeMoE,
    active_parameters,
    checkpoint_config,
    count_parameters,
    preset,
)
from .loop import TrainConfig, fit


class TrainingDiverged(MoekitError):
    """A training or validation loss that is NaN or infinite: the run stops instead of saving NaN weights."""


@dataclass
class ForecastDataConfig:
    """How train-forecaster reads its CSVs and draws its windows."""

    mixture: str = "size"  # size: series weighted by their points; equal: each CSV alike
    date_format: str = ""  # strftime format of the date columns ("": inferred, ambiguous dates refused)
    dayfirst: bool = False  # read ambiguous dates (03/04/2020) day-first
    columns: str = ""  # comma-separated columns to train on ("": every numeric column)


@dataclass
class _RunOverrides:
    """What `key=value` overrides of train-forecaster address: the model, the trainer, the data."""

    model: ForecasterConfig
    train: TrainConfig
    data: ForecastDataConfig


def default_train_config(fine_tune: bool = False) -> TrainConfig:
    """Time-MoE's optimiser (AdamW, wd 0.1, betas 0.9/0.95, warmup + cosine) at CPU scale.

    From scratch lr 5e-3 (what the tiny model needs to learn in minutes); fine-tuning lr 1e-4.
    """
    return TrainConfig(steps=300, batch_size=16, seq_len=512, lr=1e-4 if fine_tune else 5e-3, min_lr_ratio=0.05,
                       warmup_steps=15, weight_decay=0.1, grad_clip=1.0, eval_every=100, eval_batches=4,
                       save_every=100)


def normalise_windows(x_BW: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per window (Time-MoE normalises every training sequence): the corpus's
    masked normalisation with every point valid."""
    from ..data.ts_corpus import normalise

    return normalise(x_BW, np.ones_like(x_BW))


def train_forecaster(csvs: list[str | Path], out: str | Path, preset_name: str = "tiny",
                     overrides: list[str] | tuple[str, ...] = (), init: str | Path | None = None,
                     resume: bool = False, progress: bool = True, train_cfg=None,
                     date_format: str | None = None, dayfirst: bool = False,
                     columns: list[str] | str | None = None) -> dict:
    """Pre-train (or, with `init`, fine-tune) a forecaster on the train splits of CSVs.

    Overrides address the model (`model.hidden_size=96`), the trainer
    (`train.steps=500`, `train.seq_len=256`) and the data (`data.mixture=equal`).
    Windows of seq_len + 1 points are drawn from every channel of every CSV (by
    size), each normalised, as a pure function of the step; the validation loss
    uses the CSVs' validation splits (with shorter windows, said, when a split is
    shorter than seq_len + 1). The model is built after `train.seed` is set, so a
    run is reproducible. A loss that is not finite stops the run with an error.
    `date_format` / `dayfirst` / `columns` say how to read the CSVs (see
    `moekit.data.timeseries.read_csv`); a resumed run keeps its own.
    """
    from ..data.timeseries import load_training_mixture

    run = Path(out)
    if resume:
        cfg_model, tcfg, dcfg, csvs = _saved_run(run)
        base = None
    else:
        if not isinstance(columns, str):
            columns = ",".join(columns or [])
        data0 = ForecastDataConfig(date_format=date_format or "", dayfirst=bool(dayfirst), columns=columns)
        base = load_forecaster(init) if init is not None else None
        cfg_model, tcfg, dcfg = _new_run_configs(base, preset_name, train_cfg, data0, overrides)
    mixture, prepared = load_training_mixture(list(csvs), tcfg.seq_len + 1, seed=tcfg.seed, mixture=dcfg.mixture,
                                              date_format=dcfg.date_format or None, dayfirst=dcfg.dayfirst,
                                              columns=dcfg.columns or None)
    torch.manual_seed(tcfg.seed)  # the initial weights follow the run's seed (fit seeds again for the batches)
    model = TimeMoE(cfg_model)
    if base is not None:
        model.load_state_dict(base.state_dict())

    def batch_fn(step: int) -> torch.Tensor:
        return torch.from_numpy(normalise_windows(mixture.batch(step, tcfg.batch_size)))

    config_dict = checkpoint_config(cfg_model, train=to_dict(tcfg),
                                    data={"csvs": [str(Path(c).resolve()) for c in csvs], **to_dict(dcfg)},
                                    init=str(init) if init is not None else None)
    start = time.perf_counter()
    result = fit(model, tcfg, batch_fn=batch_fn, loss_fn=_finite_loss, eval_fn=_validation(prepared, tcfg),
                 run_dir=run, config_dict=config_dict, resume=resume, progress=progress,
                 tokens_per_batch=tcfg.batch_size * tcfg.seq_len)
    return {"result": result, "model": model.eval(), "seconds": time.perf_counter() - start,
            "parameters": count_parameters(model), "active_parameters": active_parameters(model),
            "datasets": [p.series.name for p in prepared], "points": mixture.num_points}


def _finite_loss(model, batch):
    """The model's training loss; one that is NaN or infinite stops the run (it would write NaN weights)."""
    loss, metrics = model.loss(batch)
    if not torch.isfinite(loss.detach()).all():
        raise TrainingDiverged(f"the training loss is {float(loss.detach())}: training stopped before an optimizer "
                               f"step could write it into the weights; lower the learning rate (train.lr=...) or "
                               f"check the CSVs")
    return loss, metrics


def _new_run_configs(base: TimeMoE | None, preset_name: str, train_cfg: TrainConfig | None,
                     data: ForecastDataConfig, overrides) -> tuple[ForecasterConfig, TrainConfig, ForecastDataConfig]:
    """The model, trainer and data configs of a new run: preset (or the --init model's), defaults, overrides."""
    cfg_model = base.cfg if base is not None else preset(preset_name)
    tcfg0 = train_cfg or default_train_config(fine_tune=base is not None)
    run_cfg = apply_overrides(_RunOverrides(cfg_model, tcfg0, data), list(overrides))
    cfg_model = run_cfg.model
    if base is not None and replace(cfg_model, kernel=base.cfg.kernel) != base.cfg:
        changed = [k for k, v in to_dict(cfg_model).items() if k != "kernel" and v != getattr(base.cfg, k)]
        raise ConfigError(f"fine-tuning keeps the --init model's architecture: drop the override(s) of "
                          f"{', '.join('model.' + k for k in changed)}")
    return cfg_model, run_cfg.train, run_cfg.data


def _validation(prepared, tcfg: TrainConfig):
    """The eval_fn scoring fixed batches of the CSVs' validation splits.

    Windows are seq_len + 1 points, or as long as the shortest validation split
    when one is shorter (warned); validation is off (warned) below 2 points.
    """
    from ..data.timeseries import DataWarning, TimeSeriesMixture

    val_parts = [p.part("val") for p in prepared]
    window = min([tcfg.seq_len + 1] + [v.shape[0] for v in val_parts])
    if window < tcfg.seq_len + 1:
        short = ", ".join(f"{p.series.name} ({v.shape[0]} rows)" for p, v in zip(prepared, val_parts)
                          if v.shape[0] < tcfg.seq_len + 1)
        if window < 2:
            warnings.warn(f"validation is off: the validation split of {short} is too short to score", DataWarning)
            return None
        warnings.warn(f"validation uses windows of {window} points, not seq_len + 1 = {tcfg.seq_len + 1}: the "
                      f"validation split of {short} is shorter", DataWarning)
    val = TimeSeriesMixture(val_parts, [p.series.name for p in prepared], window, seed=tcfg.seed + 1)
    val_batches = [torch.from_numpy(normalise_windows(val.batch(i, tcfg.batch_size))) for i in range(tcfg.eval_batches)]

    def eval_fn(m, step):
        loss = float(np.mean([m.loss(b)[1]["huber"] for b in val_batches]))
        if not np.isfinite(loss):
            raise TrainingDiverged(f"the validation Huber loss is {loss} at step {step}: training stopped (this "
                                   f"step was not saved); lower the learning rate (train.lr=...) or check the CSVs")
        return {"val_huber": loss}

    return eval_fn


def _saved_run(run: Path):
    from ..checkpoints import load_checkpoint
    from .loop import train_config_from

    ckpt = load_checkpoint(run)
    config = ckpt.config
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{run} is not a forecaster run, so --resume cannot continue it")
    cfg = from_dict(ForecasterConfig, config["forecaster"], "forecaster config")
    data = dict(config["data"])
    csvs = data.pop("csvs")
    return cfg, train_config_from(config["train"]), from_dict(ForecastDataConfig, data, "data config"), csvs
