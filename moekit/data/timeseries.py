"""Time-series data: CSV reading, the standard splits, scaling, windows and mixtures.

Holds what every forecasting command shares: `read_csv` (any CSV a user has:
a date column plus numeric channels, each problem named once by the rules of
`moekit.data.ts_csv` and `moekit.data.dates`), `forecast_context` (how much
history a forecast uses, at least `MIN_CONTEXT` points), the long-horizon benchmark splits (`split_bounds`: ETTh 12/4/4
months, ETTm four times that, anything else 70/10/20), a per-channel
`StandardScaler` fitted on the train split only, channel-independent evaluation
windows (`window_starts`, `gather_windows`) and `TimeSeriesMixture`, which
samples pre-training windows from several series as a pure function of the
step (so a resumed run sees the same batches).

Not here: date parsing, its ambiguity check and row order (`moekit.data.dates`);
encodings, separators, numbers and gap filling (`moekit.data.ts_csv`); models,
training loops, metrics (`moekit.infer.forecast_eval`).

Shape suffixes: T time steps, C channels, N windows, L context, H horizon.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import DataError
from .dates import add_months, date_readings, month_step, parse_dates, time_order
from .ts_csv import (
    Column,
    DataWarning,  # noqa: F401  (re-exported: the warning class of every repair)
    choose_columns,
    fill_missing,
    name_constant,
    numeric_columns,
    read_cells,
    warn,
)

DATE_NAMES = ("date", "datetime", "time", "timestamp", "ds")
MIN_CONTEXT = 4  # the fewest history points a forecast starts from (`--context` may go down to it)
SPLIT_SCHEMES = ("auto", "etth", "ettm", "ratio")
MIXTURES = ("size", "equal")  # how a mixture weighs its series: by points, or each series alike


@dataclass
class Series:
    """A multichannel series read from a CSV: values [T, C], channel names, optional timestamps."""

    name: str
    values_TC: np.ndarray
    channels: list[str]
    timestamps: np.ndarray | None = None  # datetime64[s], [T]
    date_column: str | None = None
    date_format: str | None = None  # strftime format of the source, for writing continued timestamps
    notes: list[str] = field(default_factory=list)

    @property
    def length(self) -> int:
        return int(self.values_TC.shape[0])

    def frequency(self) -> np.timedelta64 | None:
        """The most common step between timestamps (None without timestamps or with fewer than two)."""
        if self.timestamps is None or len(self.timestamps) < 2:
            return None
        steps = np.diff(self.timestamps)
        values, counts = np.unique(steps, return_counts=True)
        step = values[np.argmax(counts)]
        return step if step > np.timedelta64(0, "s") else None

    def month_step(self) -> int:
        """Calendar months per step (1 monthly, 3 quarterly, 12 yearly), 0 for any other spacing."""
        return month_step(self.timestamps) if self.timestamps is not None else 0

    def future_timestamps(self, horizon: int) -> list[str]:
        """`horizon` timestamps continuing the file at its frequency, formatted like the source."""
        step = self.frequency()
        if step is None:
            return [str(self.length + i) for i in range(horizon)]
        last = self.timestamps[-1]
        months = self.month_step()
        if months:  # monthly, quarterly, yearly: calendar months, not a fixed number of days
            stamps = [add_months(last, months * (i + 1)) for i in range(horizon)]
        else:
            stamps = [last + step * (i + 1) for i in range(horizon)]
        fmt = self.date_format or "%Y-%m-%d %H:%M:%S"
        return [s.astype("datetime64[s]").astype(datetime).strftime(fmt) for s in stamps]


# ---------------------------------------------------------------- reading


def read_csv(path: str | Path, *, date_column: str | None = None, channels: list[str] | str | None = None,
             date_format: str | None = None, dayfirst: bool = False) -> Series:
    """Read any CSV of a date column plus numeric channels (pandas' CSV reader and date parser).

    The rules, each problem named once (see `moekit.data.ts_csv`): UTF-8, else
    Windows-1252 / Latin-1 with a warning; comma, tab or semicolon separated;
    text cells in a numeric column and ±inf read as missing, mostly-text columns
    skipped; gaps filled by linear interpolation (nearest value at the ends) up
    to 20% of a column, refused above; constant columns kept and named.
    `channels` (a list or 'a,b,c') chooses the columns to forecast.

    The date column is `date_column`, else a column named like a date (date,
    time, timestamp, ...), else the first column if it parses as dates. Dates
    follow `date_format` (strftime codes) when given; else their format is
    inferred, and dates that read both month-first and day-first (03/04/2020)
    are refused unless `dayfirst` says which. Rows out of time order are sorted
    (warned), duplicated timestamps refused, irregular steps warned.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"CSV file {p} does not exist")
    notes: list[str] = []
    cells, sep = read_cells(p, notes)
    header = list(cells.columns)
    columns = {name: cells[name].tolist() for name in header}
    date_name = _find_date_column(header, columns, date_column, p)
    timestamps, fmt = (None, None)
    if date_name is not None:
        timestamps, fmt = parse_dates(columns[date_name], date_format, dayfirst, f"{p.name}: column {date_name!r}")
        if timestamps is None:
            warn(f"{p.name}: column {date_name!r} does not parse as dates; timestamps are ignored", notes)
    wanted, explicit = choose_columns(header, date_name, channels, p.name)
    numeric = numeric_columns(cells, wanted, explicit, sep, p.name, notes)
    if timestamps is not None:
        order = time_order(timestamps, f"{p.name}: column {date_name!r}", notes)
        if order is not None:
            timestamps = timestamps[order]
            numeric = {k: v[order] for k, v in numeric.items()}
    fill_missing(numeric, p.name, notes)
    name_constant(numeric, p.name, notes)
    values_TC = np.stack(list(numeric.values()), axis=1)
    return Series(p.stem, values_TC.astype(np.float32), list(numeric), timestamps, date_name, fmt, notes)


def _find_date_column(header: list[str], columns: dict, date_column: str | None, p: Path) -> str | None:
    if date_column is not None:
        if date_column not in columns:
            raise DataError(f"{p.name} has no column {date_column!r}; its columns are {', '.join(header)}")
        return date_column
    for name in header:
        if name.lower() in DATE_NAMES:
            return name
    first = header[0]
    if not Column(columns[first], decimal_comma=False).is_numeric() and date_readings(columns[first][:50]):
        return first
    return None


# ---------------------------------------------------------------- splits and scaling


@dataclass(frozen=True)
class Splits:
    """Row ranges [start, end) of the train, validation and test targets."""

    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]
    scheme: str

    def get(self, name: str) -> tuple[int, int]:
        if name not in ("train", "val", "test"):
            raise DataError(f"split {name!r} is unknown: accepted values are train, val, test")
        return getattr(self, name)


def split_scheme_for(name: str) -> str:
    low = name.lower()
    if low.startswith("etth"):
        return "etth"
    if low.startswith("ettm"):
        return "ettm"
    return "ratio"


def split_bounds(length: int, name: str = "", scheme: str = "auto") -> Splits:
    """The standard long-horizon splits (Informer / Autoformer / Time-Series-Library).

    ETTh*: 12/4/4 months of hourly rows (8640/2880/2880); ETTm*: four times that
    (15-minute rows); anything else: 70/10/20 of its length. A window's context
    may reach back into the previous split; only its targets lie in the split.
    """
    if scheme not in SPLIT_SCHEMES:
        raise DataError(f"split scheme {scheme!r} is unknown: accepted values are {', '.join(SPLIT_SCHEMES)}")
    if scheme == "auto":
        scheme = split_scheme_for(name)
    if scheme in ("etth", "ettm"):
        month = 30 * 24 * (4 if scheme == "ettm" else 1)
        train, val, test = 12 * month, 4 * month, 4 * month
        if length < train + val + test:
            raise DataError(
                f"{name or 'the series'} has {length} rows but the {scheme.upper()} split needs "
                f"{train + val + test} (12/4/4 months)"
            )
        return Splits((0, train), (train, train + val), (train + val, train + val + test), scheme)
    n_train, n_test = int(length * 0.7), int(length * 0.2)
    n_val = length - n_train - n_test
    return Splits((0, n_train), (n_train, n_train + n_val), (length - n_test, length), "ratio")


class StandardScaler:
    """Per-channel z-score; fit on the train split only (std with ddof 0, like scikit-learn)."""

    def __init__(self, mean_C: np.ndarray | None = None, std_C: np.ndarray | None = None) -> None:
        self.mean_C = mean_C
        self.std_C = std_C

    def fit(self, values_TC: np.ndarray) -> StandardScaler:
        values = np.asarray(values_TC, dtype=np.float64)
        self.mean_C = values.mean(axis=0)
        std = values.std(axis=0)
        self.std_C = np.where(std > 1e-12, std, 1.0)
        return self

    def transform(self, values_TC: np.ndarray) -> np.ndarray:
        self._check()
        return ((values_TC - self.mean_C) / self.std_C).astype(np.float32)

    def inverse_transform(self, values_TC: np.ndarray) -> np.ndarray:
        self._check()
        return (values_TC * self.std_C + self.mean_C).astype(np.float32)

    def _check(self) -> None:
        if self.mean_C is None:
            raise RuntimeError("StandardScaler used before fit")


@dataclass
class PreparedSeries:
    """A series scaled with its train-split statistics, ready for the protocol."""

    series: Series
    splits: Splits
    scaler: StandardScaler
    scaled_TC: np.ndarray

    def part(self, name: str) -> np.ndarray:
        start, end = self.splits.get(name)
        return self.scaled_TC[start:end]


def prepare(series: Series, scheme: str = "auto") -> PreparedSeries:
    """Split, fit the scaler on the train split, and scale the whole series."""
    bad = [c for c, ok in zip(series.channels, np.isfinite(series.values_TC).all(axis=0)) if not ok]
    if bad:
        raise DataError(f"{series.name}: channel(s) {', '.join(bad)} hold NaN or infinite values; read the file with "
                        f"read_csv, which fills them, or fill them first")
    splits = split_bounds(series.length, series.name, scheme)
    start, end = splits.train
    scaler = StandardScaler().fit(series.values_TC[start:end])
    return PreparedSeries(series, splits, scaler, scaler.transform(series.values_TC))


# ---------------------------------------------------------------- windows


def check_length(length: int, context: int, horizon: int, what: str = "the series") -> None:
    """A clear error when a series cannot hold one context + horizon window."""
    if horizon < 1:
        raise DataError(f"horizon={horizon} is invalid: it must be a positive integer")
    if context < 1:
        raise DataError(f"context={context} is invalid: it must be a positive integer")
    if length < context + horizon:
        raise DataError(
            f"{what} has {length} time steps, shorter than context + horizon = {context} + {horizon} = "
            f"{context + horizon}: use a shorter --context or --horizon"
        )


def forecast_context(length: int, context: int | None, what: str = "the series", default: int = 512) -> int:
    """The history a forecast uses: `context` (default: up to `default`), between MIN_CONTEXT and the series length."""
    if context is not None and (isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 1):
        raise DataError(f"--context {context} is invalid: it must be a positive integer (at least {MIN_CONTEXT})")
    if length < MIN_CONTEXT:
        raise DataError(f"{what} has {length} time step(s): a forecast needs at least {MIN_CONTEXT} points of history")
    if context is None:
        return min(default, length)
    if context < MIN_CONTEXT:
        raise DataError(f"--context {context} is too short: a forecast needs at least {MIN_CONTEXT} points of history")
    if context > length:
        raise DataError(f"{what} has {length} time steps, fewer than --context {context}: use --context {length} "
                        f"or less")
    return int(context)


def window_starts(splits_range: tuple[int, int], context: int, horizon: int, stride: int = 1) -> np.ndarray:
    """First target index of each window whose targets lie inside [start, end) and context at >= 0."""
    if stride < 1:
        raise DataError(f"stride={stride} is invalid: it must be a positive integer")
    start, end = splits_range
    first = max(start, context)
    if end - first < horizon:
        held = f"the split [{start}, {end}) holds {end - start} rows"
        if first > start and end - horizon >= MIN_CONTEXT:  # the context, not the split, leaves too few targets
            raise DataError(f"{held}, of which {max(0, end - first)} can be targets after the first context of "
                            f"{context}: fewer than horizon = {horizon}; use --context {end - horizon} or less, "
                            f"or a shorter horizon")
        raise DataError(f"{held}, fewer than horizon = {horizon}: use a shorter horizon")
    return np.arange(first, end - horizon + 1, stride)


def gather_windows(values_TC: np.ndarray, starts_N: np.ndarray, context: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Contexts [N, C, L] and targets [N, C, H] for the given first-target indices (channel-independent)."""
    view = np.lib.stride_tricks.sliding_window_view(values_TC, context + horizon, axis=0)  # [T-W+1, C, W]
    w = view[np.asarray(starts_N) - context]
    return np.ascontiguousarray(w[..., :context]), np.ascontiguousarray(w[..., context:])


class TimeSeriesMixture:
    """Random univariate windows from several scaled series, a pure function of the step.

    Each window picks a series with probability proportional to its number of
    points (series x channels), or equally with `mixture="equal"`, then a
    channel and a start uniformly. The same (seed, step) always gives the same
    batch, so training resumes without RNG state.
    """

    def __init__(self, parts: list[np.ndarray], names: list[str], window: int, seed: int = 0,
                 mixture: str = "size") -> None:
        self.parts = [np.asarray(p, dtype=np.float32) for p in parts]
        self.names = list(names)
        self.window = window
        self.seed = seed
        short = [f"{n} ({p.shape[0]} rows)" for n, p in zip(self.names, self.parts) if p.shape[0] < window]
        if short:
            raise DataError(
                f"training series shorter than the training window of {window} time steps: {', '.join(short)}; "
                f"use a shorter context (train.seq_len={max(1, min(p.shape[0] for p in self.parts) - 1)} or less)"
            )
        if mixture not in MIXTURES:
            raise DataError(f"mixture={mixture!r} is unknown: accepted values are {', '.join(MIXTURES)}")
        sizes = np.array([(p.shape[0] - window + 1) * p.shape[1] for p in self.parts], dtype=np.float64)
        if mixture == "equal":
            sizes = np.ones_like(sizes)
        self.probs = sizes / sizes.sum()

    @property
    def num_points(self) -> int:
        return int(sum(p.size for p in self.parts))

    def batch(self, step: int, batch_size: int) -> np.ndarray:
        """[batch_size, window] float32 windows for this step."""
        rng = np.random.default_rng([self.seed, step])
        which = rng.choice(len(self.parts), size=batch_size, p=self.probs)
        out = np.empty((batch_size, self.window), dtype=np.float32)
        for i, k in enumerate(which):
            part = self.parts[k]
            c = rng.integers(part.shape[1])
            s = rng.integers(part.shape[0] - self.window + 1)
            out[i] = part[s:s + self.window, c]
        return out


def load_training_mixture(paths: list[str | Path], window: int, seed: int = 0, split: str = "train",
                          mixture: str = "size", date_format: str | None = None, dayfirst: bool = False,
                          columns: list[str] | str | None = None) -> tuple[TimeSeriesMixture, list[PreparedSeries]]:
    """Read CSVs (dates and `columns` as `read_csv` reads them), scale each with its train statistics, and mix
    their `split` parts."""
    if not paths:
        raise DataError("no training CSV given: pass at least one --csv FILE")
    prepared = [prepare(read_csv(p, date_format=date_format, dayfirst=dayfirst, channels=columns or None))
                for p in paths]
    parts = [p.part(split) for p in prepared]
    return TimeSeriesMixture(parts, [p.series.name for p in prepared], window, seed, mixture), prepared
