"""The long-horizon forecasting protocol and its baselines.

Holds `evaluate` (test windows of the standard split, stride 1 by default,
contexts and targets on the train-fitted scaled values, channel-independent
forecasts, MSE and MAE averaged over channels, windows and steps), the
forecasters it scores (`ModelForecaster` for Time-MoE, `LastValue`,
`SeasonalNaive` with `season_length`'s period: 24 hourly, 96 at 15 min, 7
daily, 52 weekly, 12 monthly; and `DLinear` trained on the target's own train
split, windows `stride` apart, with early stopping on its validation split), and `evaluate_csv`, the one call behind
`moekit eval-forecast`. Every method sees exactly the same windows.

Not here: the model (`moekit.models.timemoe`), loading it and forecasting a
CSV (`moekit.infer.forecast`), CSV reading and splits (`moekit.data.timeseries`).

Shape suffixes: N series (windows x channels), L context, H horizon, C channels.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.timeseries import DataWarning, PreparedSeries, gather_windows, prepare, read_csv, window_starts
from ..errors import DataError

DEFAULT_HORIZONS = (96, 192, 336, 720)


@dataclass
class EvalResult:
    """One method's score on one dataset and horizon."""

    dataset: str
    method: str
    horizon: int
    mse: float
    mae: float
    windows: int


# ---------------------------------------------------------------- forecasters


class LastValue:
    """Repeat the last observed value."""

    name = "last_value"

    def predict_many(self, context_NL: np.ndarray, horizons: dict[int, int]) -> dict[int, np.ndarray]:
        return {h: np.repeat(context_NL[:n, -1:], h, axis=1) for h, n in horizons.items()}


class SeasonalNaive:
    """Repeat the last season (e.g. the last day) of the context."""

    name = "seasonal_naive"

    def __init__(self, period: int) -> None:
        if period < 1:
            raise DataError(f"season length {period} is invalid: it must be a positive integer")
        self.period = period

    def predict_many(self, context_NL: np.ndarray, horizons: dict[int, int]) -> dict[int, np.ndarray]:
        period = min(self.period, context_NL.shape[1])
        season = context_NL[:, -period:]
        out = {}
        for h, n in horizons.items():
            reps = math.ceil(h / period)
            out[h] = np.tile(season[:n], (1, reps))[:, :h]
        return out


def season_length(prepared: PreparedSeries) -> int:
    """The seasonal period in steps: a day for sub-daily data (24 hourly, 96 at 15 min), a week for daily data (7),
    a year for weekly (52), monthly (12) and quarterly (4) data; 1 (no season known) otherwise."""
    months = prepared.series.month_step()
    if months in (1, 3):
        return 12 // months
    step = prepared.series.frequency()
    if step is None or months:
        return 1
    seconds = int(step / np.timedelta64(1, "s"))
    day = 86400
    if 0 < seconds < day and day % seconds == 0:
        return day // seconds
    return {day: 7, 7 * day: 52}.get(seconds, 1)


def _say_season(prepared: PreparedSeries, period: int, context: int) -> None:
    """Warn when seasonal-naive cannot be seasonal: no known period, or a period longer than the context."""
    from ..data.dates import describe_step

    step = prepared.series.frequency()
    what = f"steps of {describe_step(step)}" if step is not None else "a file without timestamps"
    if period == 1:
        warnings.warn(f"{prepared.series.name}: no seasonal period is known for {what}, so seasonal_naive equals "
                      f"last_value", DataWarning)
    elif period > context:
        warnings.warn(f"{prepared.series.name}: the seasonal period of {period} steps ({what}) does not fit the "
                      f"context of {context}, so seasonal_naive repeats the last {context} points instead; use "
                      f"--context {period} or more for a seasonal baseline", DataWarning)


class ModelForecaster:
    """A Time-MoE model scored channel-independently, each context instance-normalised."""

    name = "time_moe"

    def __init__(self, model, batch_size: int = 512, name: str | None = None) -> None:
        self.model = model.eval()
        self.batch_size = batch_size
        if name:
            self.name = name

    def predict_many(self, context_NL: np.ndarray, horizons: dict[int, int]) -> dict[int, np.ndarray]:
        out: dict[int, list[np.ndarray]] = {h: [] for h in horizons}
        for lo in range(0, context_NL.shape[0], self.batch_size):
            hi = min(lo + self.batch_size, context_NL.shape[0])
            want = {h: min(n, hi) - lo for h, n in horizons.items() if n > lo}
            if not want:
                break
            preds = self.model.predict_many(torch.from_numpy(context_NL[lo:hi]), want)
            for h, p in preds.items():
                out[h].append(p.numpy())
        return {h: np.concatenate(v) if v else np.zeros((0, h), np.float32) for h, v in out.items()}


class DLinearNet(nn.Module):
    """DLinear (Zeng et al., AAAI 2023): moving-average trend + remainder, one linear map each, shared by channels."""

    def __init__(self, context: int, horizon: int, kernel: int = 25) -> None:
        super().__init__()
        self.kernel = kernel
        self.seasonal = nn.Linear(context, horizon)
        self.trend = nn.Linear(context, horizon)
        for layer in (self.seasonal, self.trend):  # the paper's init: a uniform average of the context
            nn.init.constant_(layer.weight, 1.0 / context)

    def forward(self, x_NL: torch.Tensor) -> torch.Tensor:
        pad = (self.kernel - 1) // 2
        padded = torch.cat([x_NL[:, :1].expand(-1, pad), x_NL, x_NL[:, -1:].expand(-1, pad)], dim=1)
        trend = nn.functional.avg_pool1d(padded[:, None], self.kernel, stride=1)[:, 0]
        return self.seasonal(x_NL - trend) + self.trend(trend)


class DLinear:
    """DLinear trained per horizon on a series' train split, early-stopped on its validation split.

    Training follows the paper's scripts: MSE loss, Adam, batch 32 windows (all
    channels), the learning rate halved every epoch, at most `epochs` epochs
    with patience 3 on the validation MSE.
    """

    name = "dlinear"

    def __init__(self, epochs: int = 10, lr: float = 0.005, batch_size: int = 32, patience: int = 3,
                 seed: int = 0, max_train_windows: int | None = None, stride: int = 1) -> None:
        self.epochs, self.lr, self.batch_size, self.patience = epochs, lr, batch_size, patience
        self.seed = seed
        self.max_train_windows = max_train_windows
        self.stride = stride  # steps between training (and validation) windows, as eval-forecast's --stride
        self.nets: dict[int, DLinearNet] = {}

    def fit(self, prepared: PreparedSeries, horizons: list[int], context: int, progress: bool = False) -> DLinear:
        for h in horizons:
            self.nets[h] = self._fit_one(prepared, h, context, progress)
        return self

    def _fit_one(self, prepared: PreparedSeries, horizon: int, context: int, progress: bool) -> DLinearNet:
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        values = prepared.scaled_TC
        train, val = self._windows(prepared, horizon, context)
        if self.max_train_windows and len(train) > self.max_train_windows:
            train = np.sort(rng.choice(train, self.max_train_windows, replace=False))
        net = DLinearNet(context, horizon)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        best, best_state, bad = math.inf, None, 0
        for epoch in range(self.epochs):
            for group in opt.param_groups:
                group["lr"] = self.lr * 0.5**epoch
            net.train()
            for idx in np.array_split(rng.permutation(train), max(1, len(train) // self.batch_size)):
                x, y = _flat(*gather_windows(values, idx, context, horizon))
                loss = nn.functional.mse_loss(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if not len(val):
                continue  # no validation window: every epoch runs, the last weights are kept
            score = self._score(net, values, val, context, horizon)
            if score < best - 1e-7:
                best, best_state, bad = score, {k: v.clone() for k, v in net.state_dict().items()}, 0
            else:
                bad += 1
                if bad >= self.patience:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        return net.eval()

    def _windows(self, prepared: PreparedSeries, horizon: int, context: int) -> tuple[np.ndarray, np.ndarray]:
        """Training and validation window starts every `stride` steps; a short train split is named."""
        name = prepared.series.name
        try:
            train = window_starts(prepared.splits.train, context, horizon, self.stride)
        except DataError as e:
            raise DataError(f"{name}: the DLinear baseline cannot train for horizon {horizon}: its train split is "
                            f"too short ({e}); or pass --no-baselines") from None
        try:
            val = window_starts(prepared.splits.val, context, horizon, self.stride)
        except DataError:
            lo, hi = prepared.splits.val
            warnings.warn(f"{name}: the validation split [{lo}, {hi}) is too short for horizon {horizon}, so DLinear "
                          f"trains all {self.epochs} epochs without early stopping", DataWarning)
            val = np.zeros(0, dtype=np.int64)
        return train, val

    @torch.no_grad()
    def _score(self, net, values, starts, context, horizon) -> float:
        net.eval()
        total, count = 0.0, 0
        for idx in np.array_split(starts, max(1, len(starts) // 256)):
            x, y = _flat(*gather_windows(values, idx, context, horizon))
            total += float(((net(x) - y) ** 2).sum())
            count += y.numel()
        return total / max(count, 1)

    @torch.no_grad()
    def predict_many(self, context_NL: np.ndarray, horizons: dict[int, int]) -> dict[int, np.ndarray]:
        missing = [h for h in horizons if h not in self.nets]
        if missing:
            raise RuntimeError(f"DLinear was not fitted for horizon(s) {missing}")
        x = torch.from_numpy(np.ascontiguousarray(context_NL))
        return {h: self.nets[h](x[:n]).numpy() for h, n in horizons.items()}


def _flat(x_NCL: np.ndarray, y_NCH: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(x_NCL.reshape(-1, x_NCL.shape[-1])),
            torch.from_numpy(y_NCH.reshape(-1, y_NCH.shape[-1])))


# ---------------------------------------------------------------- the harness


def evaluate(prepared: PreparedSeries, methods: list, horizons=DEFAULT_HORIZONS, context: int = 512,
             stride: int = 1, split: str = "test", windows_per_batch: int = 64,
             progress: bool = True) -> list[EvalResult]:
    """Score each method on the same windows: MSE and MAE on scaled values over channels, windows, steps.

    Window starts lie every `stride` steps from the split's first target; a
    horizon uses the starts whose targets end inside the split.
    """
    horizons = sorted(_check_horizons(horizons))
    if context < 1:
        raise DataError(f"context={context} is invalid: it must be a positive integer")
    name = prepared.series.name
    lo, hi = prepared.splits.get(split)
    if prepared.series.length < context + horizons[0] or hi - max(lo, context) < horizons[0]:
        fix = (f"use --context {hi - horizons[0]} or less" if hi - lo >= horizons[0] and hi - horizons[0] >= 1
               else f"use --horizons of at most {hi - lo}")
        raise DataError(
            f"{name} has {prepared.series.length} time steps and its {split} split [{lo}, {hi}) holds "
            f"{hi - lo}: too short for context {context} + horizon {horizons[0]}; {fix}"
        )
    starts = window_starts((lo, hi), context, horizons[0], stride)
    valid = {h: int((starts <= hi - h).sum()) for h in horizons}
    too_long = [h for h, n in valid.items() if n == 0]
    if too_long:
        raise DataError(
            f"{name}'s {split} split [{lo}, {hi}) holds {hi - lo} rows, {hi - max(lo, context)} of them after the "
            f"context of {context}: too short for horizon(s) {', '.join(map(str, too_long))}; use --horizons of at "
            f"most {hi - max(lo, context)}"
        )
    sums = {(m.name, h): np.zeros(3) for m in methods for h in horizons}  # squared, absolute, count
    batches = [starts[i:i + windows_per_batch] for i in range(0, len(starts), windows_per_batch)]
    bar = _progress(len(batches) * len(methods), f"eval {name}", progress)
    offset = 0
    for batch in batches:
        x_NCL, _ = gather_windows(prepared.scaled_TC, batch, context, 0)
        channels = x_NCL.shape[1]
        want = {h: max(0, min(valid[h] - offset, len(batch))) * channels for h in horizons}
        want = {h: n for h, n in want.items() if n > 0}
        targets = {h: _targets(prepared.scaled_TC, batch[: n // channels], h) for h, n in want.items()}
        contexts = x_NCL.reshape(-1, context)
        for method in methods:
            preds = method.predict_many(contexts, want)
            for h, y in targets.items():
                err = preds[h][: y.shape[0]] - y
                sums[(method.name, h)] += (float((err**2).sum()), float(np.abs(err).sum()), err.size)
            bar.update(1)
        offset += len(batch)
    bar.close()
    return [EvalResult(name, m.name, h, s[0] / s[2], s[1] / s[2], valid[h])
            for m in methods for h in horizons for s in [sums[(m.name, h)]]]


def _targets(values_TC: np.ndarray, starts: np.ndarray, horizon: int) -> np.ndarray:
    idx = starts[:, None] + np.arange(horizon)[None]
    return values_TC[idx].transpose(0, 2, 1).reshape(-1, horizon)  # [N*C, H], window-major like the contexts


def _check_horizons(horizons) -> list[int]:
    out = []
    for h in horizons:
        if not isinstance(h, (int, np.integer)) or isinstance(h, bool) or h < 1:
            raise DataError(f"horizon={h!r} is invalid: every horizon must be a positive integer")
        out.append(int(h))
    if not out:
        raise DataError("no horizon given: pass at least one positive integer")
    return out


def parse_horizons(text: str) -> list[int]:
    """'96,192' -> [96, 192], with a clear error for anything else."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DataError(f"--horizons {text!r} is invalid: expected comma-separated positive integers like 96,192,336,720") from None
    return _check_horizons(values)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def baselines(prepared: PreparedSeries, horizons, context: int, dlinear: bool = True,
              progress: bool = True, dlinear_kwargs: dict | None = None, season: int | None = None) -> list:
    """Last value, seasonal naive (`season`, default `season_length`; warned when it cannot be seasonal) and
    DLinear fitted on this series' train split."""
    period = season or season_length(prepared)
    _say_season(prepared, period, context)
    methods = [LastValue(), SeasonalNaive(period)]
    if dlinear:
        methods.append(DLinear(**(dlinear_kwargs or {})).fit(prepared, sorted(horizons), context, progress))
    return methods


def evaluate_csv(model_path: str | Path, csv_path: str | Path, horizons=DEFAULT_HORIZONS, context: int = 512,
                 stride: int = 1, with_baselines: bool = True, progress: bool = True,
                 date_format: str | None = None, dayfirst: bool = False, columns=None,
                 season: int | None = None) -> list[EvalResult]:
    """`moekit eval-forecast`: the model and the baselines on the CSV's test windows (dates and `columns` read as
    `read_csv` says). DLinear trains on windows `stride` apart, as the test windows are."""
    from .forecast import load_forecaster

    horizons = _check_horizons(horizons)
    if stride < 1:
        raise DataError(f"--stride {stride} is invalid: it must be a positive integer")
    model = load_forecaster(model_path)
    prepared = prepare(read_csv(csv_path, date_format=date_format, dayfirst=dayfirst, channels=columns))
    methods = [ModelForecaster(model)]
    if with_baselines:
        methods += baselines(prepared, horizons, context, progress=progress, dlinear_kwargs={"stride": stride},
                             season=season)
    return evaluate(prepared, methods, horizons, context, stride, progress=progress)


def results_table(results: list[EvalResult]) -> str:
    """A markdown table: one row per dataset and horizon, MSE / MAE per method, plus the averages."""
    methods = list(dict.fromkeys(r.method for r in results))
    keys = list(dict.fromkeys((r.dataset, r.horizon) for r in results))
    by = {(r.dataset, r.horizon, r.method): r for r in results}
    head = "| dataset | horizon | windows | " + " | ".join(f"{m} MSE | {m} MAE" for m in methods) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(methods))]
    for d, h in keys:
        cells = []
        for m in methods:
            r = by.get((d, h, m))
            cells += [f"{r.mse:.3f}", f"{r.mae:.3f}"] if r else ["", ""]
        n = next(by[(d, h, m)].windows for m in methods if (d, h, m) in by)
        lines.append(f"| {d} | {h} | {n} | " + " | ".join(cells) + " |")
    for d in dict.fromkeys(k[0] for k in keys):
        cells = []
        for m in methods:
            rs = [r for r in results if r.dataset == d and r.method == m]
            cells += [f"{np.mean([r.mse for r in rs]):.3f}", f"{np.mean([r.mae for r in rs]):.3f}"]
        lines.append(f"| {d} | avg | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_dicts(results: list[EvalResult]) -> list[dict]:
    return [asdict(r) for r in results]
