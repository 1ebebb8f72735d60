"""Pretraining moekit's default forecaster: build the corpus, train, calibrate quantiles, save in Time-MoE's layout.

Holds `pretrain_forecaster` (the one call behind `moekit pretrain-forecaster`):
the corpus (`moekit.data.ts_corpus`: the ETT train splits, the series sktime
and statsmodels ship, KernelSynth, TSMixup) is built once into the run
directory and read back on `--resume`; windows are a pure function of the step,
so a resumed run continues exactly; validation uses the ETT validation splits
of the datasets not excluded; after training, the quantile table
(`moekit.models.forecast_quantiles`) is calibrated on those validation
windows, and the model is written in Time-MoE's Hugging Face layout
(`hf/`: config.json + model.safetensors + quantiles.json). Also `PRETRAIN_PRESET`,
the model size and schedule chosen for 2 CPU cores.

Not here: fine-tuning on a user's CSVs (`moekit.train.forecaster`), the
model (`moekit.models.timemoe`), forecasting (`moekit.infer.forecast`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..config import apply_overrides, field_list, from_dict, to_dict
from ..errors import CheckpointError, ConfigError, DataError
from ..models.timemoe import MODEL_TYPE, ForecasterConfig, TimeMoE, active_parameters, checkpoint_config, \
    count_parameters, dense_equivalent
from .loop import TrainConfig, fit

PRETRAIN_PRESET = ForecasterConfig(hidden_size=64, intermediate_size=256, num_layers=4, num_heads=4,
                                   horizon_lengths=[1, 8, 32, 96, 192])
CALIBRATION_HORIZON = 720


@dataclass
class CorpusConfig:
    """What the corpus holds: datasets left out, KernelSynth size, the window mixture, the seed."""

    exclude: list[str] = field_list([])
    synthetic: int = 800
    synthetic_length: int = 1024
    real_weight: float = 0.4
    mixup_weight: float = 0.3
    synthetic_weight: float = 0.3
    seed: int = 0


@dataclass
class _Overrides:
    model: ForecasterConfig
    train: TrainConfig
    corpus: CorpusConfig


def default_pretrain_config() -> TrainConfig:
    """The shipped forecaster's schedule: 1500 steps of 16 windows of 513 points (12M time points)."""
    return TrainConfig(steps=1500, batch_size=16, seq_len=512, lr=5e-3, min_lr_ratio=0.05, warmup_steps=60,
                       weight_decay=0.1, grad_clip=1.0, eval_every=400, eval_batches=4, save_every=200, device="cpu")


def pretrain_forecaster(out: str | Path, data_dir: str | Path | None, exclude: list[str] | tuple[str, ...] = (),
                        overrides: list[str] | tuple[str, ...] = (), dense: bool = False, resume: bool = False,
                        progress: bool = True, corpus_file: str | Path | None = None) -> dict:
    """Build the corpus, pretrain, calibrate the quantiles and save; returns a summary with the seconds taken."""
    from ..data.ts_corpus import Corpus, CorpusMixture, build_corpus

    start = time.perf_counter()
    run = Path(out)
    if resume:
        cfg, tcfg, ccfg, data_dir = _saved_run(run)
        if any(not o.strip().startswith("train.") for o in overrides):
            raise ConfigError("--resume keeps the run's model and corpus: only train.* overrides "
                              "(e.g. train.steps=3000) are accepted")
        tcfg = apply_overrides(_Overrides(cfg, tcfg, ccfg), list(overrides)).train
        corpus = Corpus.load(run / "corpus.npz")
    else:
        base = dense_equivalent(PRETRAIN_PRESET) if dense else PRETRAIN_PRESET
        o = apply_overrides(_Overrides(replace(base), default_pretrain_config(), CorpusConfig(exclude=list(exclude))),
                            list(overrides))
        cfg, tcfg, ccfg = o.model, o.train, o.corpus
        corpus = _reused(corpus_file, ccfg.exclude) if corpus_file else build_corpus(
            data_dir, ccfg.exclude, seed=ccfg.seed, synthetic=ccfg.synthetic,
            synthetic_length=ccfg.synthetic_length, progress=progress)
        run.mkdir(parents=True, exist_ok=True)
        corpus.save(run / "corpus.npz")
    built = time.perf_counter() - start
    mixture = CorpusMixture(corpus, tcfg.seq_len + 1, seed=tcfg.seed,
                            weights=(ccfg.real_weight, ccfg.mixup_weight, ccfg.synthetic_weight))
    torch.manual_seed(tcfg.seed)
    model = TimeMoE(cfg)

    def batch_fn(step: int):
        x, mask = mixture.batch(step, tcfg.batch_size)
        return torch.from_numpy(x), torch.from_numpy(mask)

    val = _validation_windows(data_dir, ccfg.exclude, tcfg.seq_len)
    config_dict = checkpoint_config(cfg, train=to_dict(tcfg), corpus=to_dict(ccfg),
                                    data_dir=str(Path(data_dir).resolve()) if data_dir else None,
                                    sources=corpus.sources, corpus_points=corpus.summary())
    result = fit(model, tcfg, batch_fn=batch_fn, loss_fn=lambda m, b: m.loss(b[0], b[1]),
                 eval_fn=_eval_fn(val, tcfg) if val is not None else None, run_dir=run, config_dict=config_dict,
                 resume=resume, progress=progress, tokens_per_batch=tcfg.batch_size * tcfg.seq_len)
    summary = {"result": result, "model": model.eval(), "parameters": count_parameters(model),
               "active_parameters": active_parameters(model), "corpus": corpus.summary(),
               "corpus_seconds": built, "table": None}
    if not result.interrupted:
        summary["table"] = _finish(model, run, data_dir, ccfg.exclude, tcfg.seq_len)
    summary["seconds"] = time.perf_counter() - start
    if not result.interrupted:
        (run / "pretrain_time.json").write_text(json.dumps({"seconds": summary["seconds"], "corpus_seconds": built,
                                                            "steps": tcfg.steps}, indent=1) + "\n")
    return summary


def _finish(model: TimeMoE, run: Path, data_dir, exclude, context: int):
    """Calibrate the quantile table on the validation splits and write the Hugging Face layout into run/hf."""
    from ..hf.timemoe import save_hf
    from ..models.forecast_quantiles import calibrate

    hf = save_hf(model, run / "hf")
    windows = _ett_windows(data_dir, exclude, "val", context, CALIBRATION_HORIZON, stride=24)
    if windows is None:
        return None
    table = calibrate(model, *windows, source=f"ETT validation splits ({', '.join(_included(exclude))})")
    table.save(hf)
    table.save(run)
    return table


def _reused(corpus_file, exclude):
    """A corpus another run built (its corpus.npz), refused when it holds a dataset this run excludes."""
    from ..data.ts_corpus import Corpus

    if not Path(corpus_file).is_file():
        raise DataError(f"--corpus {corpus_file}: no such file; give the corpus.npz of an earlier pretrain-forecaster run")
    corpus = Corpus.load(corpus_file)
    held = sorted({n.split("/")[0] for n in corpus.names} & set(exclude))
    if held:
        raise DataError(f"--corpus {corpus_file} holds {', '.join(held)}, which this run excludes; build a new corpus")
    return corpus


def _included(exclude) -> list[str]:
    from ..data.ts_corpus import ETT_NAMES

    return [n for n in ETT_NAMES if n not in set(exclude)]


def _ett_windows(data_dir, exclude, split: str, context: int, horizon: int, stride: int):
    """(contexts [N, L], targets [N, H]) from a split of each included ETT file, every channel, raw values."""
    from ..data.timeseries import gather_windows, prepare, read_csv, window_starts

    if data_dir is None or not _included(exclude):
        return None
    xs, ys = [], []
    for name in _included(exclude):
        prepared = prepare(read_csv(Path(data_dir) / f"{name}.csv"))
        lo, hi = prepared.splits.get(split)
        values = prepared.series.values_TC
        starts = window_starts((lo, hi), context, horizon, stride)
        if len(starts):
            x, y = gather_windows(values, starts, context, horizon)  # [N, C, L], [N, C, H]
            xs.append(x.reshape(-1, context))
            ys.append(y.reshape(-1, horizon))
    return (np.concatenate(xs), np.concatenate(ys)) if xs else None


def _validation_windows(data_dir, exclude, seq_len: int):
    """Fixed validation windows of seq_len + 1 points (normalised) from the ETT validation splits, or None."""
    from ..data.ts_corpus import normalise

    windows = _ett_windows(data_dir, exclude, "val", seq_len, 1, stride=97)
    if windows is None:
        return None
    x = np.concatenate([windows[0], windows[1]], axis=1)
    return torch.from_numpy(normalise(x, np.ones_like(x)))


def _eval_fn(val: torch.Tensor, tcfg: TrainConfig):
    batches = list(torch.split(val, tcfg.batch_size * 4))

    def eval_fn(m, step):
        return {"val_huber": float(np.mean([m.loss(b)[1]["huber"] for b in batches]))}

    return eval_fn


def _saved_run(run: Path):
    from ..checkpoints import load_checkpoint
    from .loop import train_config_from

    if not (run / "corpus.npz").is_file():
        raise CheckpointError(f"{run} has no corpus.npz: it is not a pretrain-forecaster run, so --resume cannot "
                              f"continue it")
    config = load_checkpoint(run).config
    if config.get("model_type") != MODEL_TYPE or "corpus" not in config:
        raise CheckpointError(f"{run} is not a pretrain-forecaster run, so --resume cannot continue it")
    cfg = from_dict(ForecasterConfig, config["forecaster"], "forecaster config")
    return cfg, train_config_from(config["train"]), from_dict(CorpusConfig, config["corpus"], "corpus config"), \
        config.get("data_dir")


def check_data_dir(data_dir: str | Path | None, exclude) -> Path | None:
    """The ETT directory, or a clear error naming what is missing; None when every ETT file is excluded."""
    from ..data.ts_corpus import ETT_NAMES

    if set(ETT_NAMES) <= set(exclude):
        return None
    if data_dir is None or not Path(data_dir).is_dir():
        raise DataError(f"--data-dir {data_dir}: not a directory; it must hold ETTh1.csv, ETTh2.csv and ETTm1.csv "
                        f"(../shared/data/timeseries), or exclude them with --exclude ETTh1,ETTh2,ETTm1")
    return Path(data_dir)
