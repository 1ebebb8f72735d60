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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from ..hf.timemoe import load_forecaster

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
    model = load_forecaster(model_path)
    history_CL = torch.from_numpy(series.values_TC[-context:].T.copy())
    values_HC = model.predict(history_CL, horizon).numpy().T
    stamps = series.future_timestamps(horizon)
    result = CsvForecast(series.channels, stamps, values_HC, context, None, None)
    if out is not None:
        result.out = _write_forecast(Path(out), series.date_column or "step", series.channels, stamps, values_HC)
    if plot is not None:
        result.plot = plot_forecast(Path(plot), series, stamps, values_HC, context)
    return result


def _write_forecast(path: Path, date_name: str, channels: list[str], stamps: list[str], values_HC) -> Path:
    import csv

    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow([date_name, *channels])
            for stamp, row in zip(stamps, values_HC):
                w.writerow([stamp, *(f"{v:.6g}" for v in row)])
        tmp.replace(path)
    except OSError as e:
        if tmp.is_file():
            tmp.unlink()
        raise ConfigError(f"cannot write the forecast to {path}: {e.strerror or e}") from None
    return path


def plot_forecast(path: Path, series, stamps: list[str], values_HC: np.ndarray, context: int) -> Path:
    """One panel per channel: the recent history and the forecast after it."""
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
