"""Forecasting with a trained Time-MoE: `moekit forecast`'s CSV in, forecast CSV (and plot) out.

Holds `forecast_csv` (every numeric channel of a CSV forecast past its end,
timestamps continued at the file's frequency), `CsvForecast` (what it
produced), `plot_forecast` (history and forecast, matplotlib's Agg backend)
and, re-exported from `moekit.hf.timemoe`, `load_forecaster` (a moekit
forecaster checkpoint or a Time-MoE Hugging Face directory).

Not here: the model (`moekit.models.timemoe`), the Hugging Face format
(`moekit.hf.timemoe`), training (`moekit.train.forecaster`), the evaluation
protocol and baselines (`moekit.infer.forecast_eval`).

Shape suffixes: H horizon, C channels, L context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError, DataError
from ..hf.timemoe import load_forecaster
from ..models.forecast_quantiles import context_std

__all__ = ["CsvForecast", "forecast_csv", "load_forecaster", "plot_forecast"]


@dataclass
class CsvForecast:
    """What `forecast_csv` produced."""

    channels: list[str]
    timestamps: list[str]
    values_HC: np.ndarray
    context: int
    out: Path | None
    plot: Path | None
    quantiles_HCQ: np.ndarray | None = None  # per channel, the levels below; None when the model has no table
    levels: list[float] = field(default_factory=list)


def forecast_csv(model_path: str | Path, csv_path: str | Path, horizon: int, context: int | None = None,
                 out: str | Path | None = None, plot: str | Path | None = None,
                 date_format: str | None = None, dayfirst: bool = False, columns=None) -> CsvForecast:
    """Forecast every numeric channel `horizon` steps past the end of a CSV.

    Each channel's last `context` points (default: up to 512, at most the
    series length; at least 4, `MIN_CONTEXT`) are instance-normalised, forecast, and
    de-normalised. Writes a CSV with timestamps continued at the file's
    frequency and, with `plot`, a PNG of history and forecast. `date_format` /
    `dayfirst` say how to read the date column (see `read_csv`).
    """
    from ..data.timeseries import forecast_context, read_csv

    if not isinstance(horizon, int) or horizon < 1:
        raise DataError(f"--horizon {horizon} is invalid: it must be a positive integer")
    series = read_csv(csv_path, date_format=date_format, dayfirst=dayfirst, channels=columns)
    context = forecast_context(series.length, context, Path(csv_path).name)
    model, table = load_forecaster(model_path), quantile_table(model_path)
    history_CL = series.values_TC[-context:].T.copy()
    values_HC = model.predict(torch.from_numpy(history_CL), horizon).numpy().T
    if not np.isfinite(values_HC).all():
        raise CheckpointError(f"the forecaster {model_path or 'that ships with moekit'} gives non-finite forecasts "
                              f"(its weights hold NaN or inf): retrain it; nothing was written")
    stamps = series.future_timestamps(horizon)
    quantiles_HCQ = None
    if table is not None:
        quantiles_HCQ = table.apply(values_HC.T.astype(np.float64), context_std(history_CL)).transpose(1, 0, 2)
    result = CsvForecast(series.channels, stamps, values_HC, context, None, None, quantiles_HCQ,
                         list(table.levels) if table is not None else [])
    if out is not None:
        result.out = _write_forecast(Path(out), series.date_column or "step", result)
    if plot is not None:
        result.plot = plot_forecast(Path(plot), series, stamps, values_HC, context, result)
    return result


def quantile_table(model_path):
    """The quantile table saved beside a forecaster (None: the shipped one's), or None when it has none."""
    from ..hf.timemoe import forecaster_dir
    from ..models.forecast_quantiles import load_table

    return load_table(forecaster_dir(model_path))


def level_name(level: float) -> str:
    """0.1 -> 'q10': the suffix of a quantile column."""
    return f"q{round(level * 100):02d}"


def _write_forecast(path: Path, date_name: str, res: CsvForecast) -> Path:
    """channel, then channel_q10, channel_q50, channel_q90 (when the model has a quantile table) for each channel."""
    import csv

    header, columns = [date_name], []
    for c, name in enumerate(res.channels):
        header.append(name)
        columns.append(res.values_HC[:, c])
        for q, level in enumerate(res.levels):
            header.append(f"{name}_{level_name(level)}")
            columns.append(res.quantiles_HCQ[:, c, q])
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for h, stamp in enumerate(res.timestamps):
                w.writerow([stamp, *(f"{col[h]:.6g}" for col in columns)])
        tmp.replace(path)
    except OSError as e:
        if tmp.is_file():
            tmp.unlink()
        raise ConfigError(f"cannot write the forecast to {path}: {e.strerror or e}") from None
    return path


def plot_forecast(path: Path, series, stamps: list[str], values_HC: np.ndarray, context: int,
                  res: CsvForecast | None = None) -> Path:
    """One panel per channel: the recent history, the forecast after it and, with quantiles, the shaded band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    horizon = values_HC.shape[0]
    shown = min(series.length, max(context, 2 * horizon))
    channels = series.channels
    fig, axes = plt.subplots(len(channels), 1, figsize=(10, 1.8 * len(channels) + 0.6), sharex=True, squeeze=False)
    hist_x = np.arange(-shown, 0)
    fut_x = np.arange(0, horizon)
    for c, ax in enumerate(axes[:, 0]):
        ax.plot(hist_x, series.values_TC[-shown:, c], color="0.3", lw=0.9, label="history")
        ax.plot(fut_x, values_HC[:, c], color="tab:red", lw=1.2, label="forecast")
        if res is not None and res.quantiles_HCQ is not None and len(res.levels) >= 2:
            lo, hi = res.levels[0], res.levels[-1]
            ax.fill_between(fut_x, res.quantiles_HCQ[:, c, 0], res.quantiles_HCQ[:, c, -1], color="tab:red",
                            alpha=0.2, lw=0, label=f"{round(lo * 100)}-{round(hi * 100)}% interval")
        ax.axvline(0, color="0.6", lw=0.6, ls="--")
        ax.set_ylabel(channels[c], fontsize=8)
    axes[0, 0].legend(loc="upper left", fontsize=8)
    axes[0, 0].set_title(f"{series.name}: {horizon}-step forecast from {stamps[0]} (context {context})", fontsize=9)
    axes[-1, 0].set_xlabel("steps relative to the end of the file")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
