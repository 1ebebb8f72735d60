"""Time-series data: CSV reading, the standard splits, scaling, windows and mixtures.

Holds what every forecasting command shares: `read_csv` (pandas' CSV reader;
a date column plus numeric channels; missing values filled, non-numeric
columns named and skipped), the long-horizon benchmark splits (`split_bounds`: ETTh 12/4/4
months, ETTm four times that, anything else 70/10/20), a per-channel
`StandardScaler` fitted on the train split only, channel-independent evaluation
windows (`window_starts`, `gather_windows`) and `TimeSeriesMixture`, which
samples pre-training windows from several series as a pure function of the
step (so a resumed run sees the same batches).

Not here: date parsing and its ambiguity check (`moekit.data.dates`), models,
training loops, metrics (`moekit.infer.forecast_eval`).

Shape suffixes: T time steps, C channels, N windows, L context, H horizon.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import DataError
from .dates import date_readings, parse_dates

DATE_NAMES = ("date", "datetime", "time", "timestamp", "ds")
MISSING = {"", "nan", "na", "n/a", "null", "none", "?", "-"}
SPLIT_SCHEMES = ("auto", "etth", "ettm", "ratio")
MIXTURES = ("size", "equal")  # how a mixture weighs its series: by points, or each series alike


class DataWarning(UserWarning):
    """Input data that was usable after a repair (filled gaps, skipped columns)."""


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

    @property
    def num_channels(self) -> int:
        return int(self.values_TC.shape[1])

    def frequency(self) -> np.timedelta64 | None:
        """The most common step between timestamps (None without timestamps or with fewer than two)."""
        if self.timestamps is None or len(self.timestamps) < 2:
            return None
        steps = np.diff(self.timestamps)
        values, counts = np.unique(steps, return_counts=True)
        step = values[np.argmax(counts)]
        return step if step > np.timedelta64(0, "s") else None

    def future_timestamps(self, horizon: int) -> list[str]:
        """`horizon` timestamps continuing the file at its frequency, formatted like the source."""
        step = self.frequency()
        if step is None:
            return [str(self.length + i) for i in range(horizon)]
        last = self.timestamps[-1]
        stamps = [last + step * (i + 1) for i in range(horizon)]
        fmt = self.date_format or "%Y-%m-%d %H:%M:%S"
        return [s.astype("datetime64[s]").astype(datetime).strftime(fmt) for s in stamps]


# ---------------------------------------------------------------- reading


def read_csv(path: str | Path, *, date_column: str | None = None, channels: list[str] | None = None,
             date_format: str | None = None, dayfirst: bool = False) -> Series:
    """Read a CSV of a date column plus numeric channels (pandas' CSV reader and date parser).

    The date column is `date_column`, else a column named like a date (date,
    time, timestamp, ...), else the first column if it parses as dates. Dates
    follow `date_format` (strftime codes) when given; else their format is
    inferred, and dates that read both month-first and day-first (03/04/2020)
    are refused unless `dayfirst` says which. Other non-numeric columns are
    skipped with a warning naming them; missing cells are forward-filled
    (back-filled at the start) with a warning giving the count.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"CSV file {p} does not exist")
    header, columns = _read_columns(p)
    date_name = _find_date_column(header, columns, date_column, p)
    timestamps, fmt = (None, None)
    if date_name is not None:
        timestamps, fmt = parse_dates(columns[date_name], date_format, dayfirst, f"{p.name}: column {date_name!r}")
        if timestamps is None:
            warnings.warn(f"{p.name}: column {date_name!r} does not parse as dates; timestamps are ignored", DataWarning)
    wanted = [c for c in header if c != date_name]
    if channels:
        missing = [c for c in channels if c not in header]
        if missing:
            raise DataError(f"{p.name} has no column(s) {', '.join(missing)}; its columns are {', '.join(header)}")
        wanted = list(channels)
    numeric, skipped = {}, []
    for name in wanted:
        values = _parse_numeric(columns[name])
        if values is None:
            skipped.append(name)
        else:
            numeric[name] = values
    if not numeric:
        raise DataError(
            f"{p.name} has no numeric column: expected a date column plus numeric channels, got columns "
            f"{', '.join(header)}"
        )
    notes = []
    if skipped:
        notes.append(f"{p.name}: skipped non-numeric column(s) {', '.join(skipped)}")
        warnings.warn(notes[-1], DataWarning)
    values_TC = np.stack(list(numeric.values()), axis=1)
    filled = _fill_missing(values_TC)
    if filled:
        notes.append(f"{p.name}: filled {filled} missing value(s) (forward fill, back fill at the start)")
        warnings.warn(notes[-1], DataWarning)
    return Series(p.stem, values_TC.astype(np.float32), list(numeric), timestamps, date_name, fmt, notes)


def _read_columns(p: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Header and stripped string cells per column; rows whose cells are all blank are dropped."""
    import pandas as pd

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # rows longer than the header
            df = pd.read_csv(p, dtype=str, keep_default_na=False, index_col=False, encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{p} is not a UTF-8 text CSV file") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{p} is empty: expected a header row (a date column plus numeric channels)") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning) as e:
        raise DataError(f"{p} is not a readable CSV file: {str(e).strip()}") from None
    header = [str(h).strip() for h in df.columns]
    cells = df.fillna("").apply(lambda col: col.str.strip())
    cells = cells[(cells != "").any(axis=1)]
    if cells.empty:
        raise DataError(f"{p} has a header but no data rows")
    return header, {name: cells.iloc[:, i].tolist() for i, name in enumerate(header)}


def _find_date_column(header: list[str], columns: dict, date_column: str | None, p: Path) -> str | None:
    if date_column is not None:
        if date_column not in columns:
            raise DataError(f"{p.name} has no column {date_column!r}; its columns are {', '.join(header)}")
        return date_column
    for name in header:
        if name.lower() in DATE_NAMES:
            return name
    first = header[0]
    if _parse_numeric(columns[first]) is None and date_readings(columns[first][:50]):
        return first
    return None


def _parse_numeric(cells: list[str]) -> np.ndarray | None:
    """Floats with NaN for missing cells, or None when any present cell is not a number."""
    out = np.empty(len(cells), dtype=np.float64)
    present = 0
    for i, cell in enumerate(cells):
        s = cell.strip()
        if s.lower() in MISSING:
            out[i] = np.nan
            continue
        try:
            out[i] = float(s)
        except ValueError:
            return None
        present += 1
    return out if present else None


def _fill_missing(values_TC: np.ndarray) -> int:
    """Forward-fill NaNs in place per channel (back-fill leading ones); return how many were filled."""
    nan_TC = np.isnan(values_TC)
    count = int(nan_TC.sum())
    if not count:
        return 0
    t = np.arange(values_TC.shape[0])
    for c in range(values_TC.shape[1]):
        col, nan = values_TC[:, c], nan_TC[:, c]
        if not nan.any():
            continue
        last = np.where(~nan, t, 0)
        np.maximum.accumulate(last, out=last)
        first_valid = int(np.argmax(~nan))
        col[:] = col[last]
        col[:first_valid] = col[first_valid]
    return count


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


def window_starts(splits_range: tuple[int, int], context: int, horizon: int, stride: int = 1) -> np.ndarray:
    """First target index of each window whose targets lie inside [start, end) and context at >= 0."""
    if stride < 1:
        raise DataError(f"stride={stride} is invalid: it must be a positive integer")
    start, end = splits_range
    first = max(start, context)
    if end - first < horizon:
        raise DataError(
            f"the split [{start}, {end}) holds {end - start} rows, fewer than horizon = {horizon} "
            f"(with context = {context})"
        )
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
                f"use a shorter context"
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
                          mixture: str = "size", date_format: str | None = None,
                          dayfirst: bool = False) -> tuple[TimeSeriesMixture, list[PreparedSeries]]:
    """Read CSVs (dates as `read_csv` reads them), scale each with its train statistics, and mix their `split` parts."""
    if not paths:
        raise DataError("no training CSV given: pass at least one --csv FILE")
    prepared = [prepare(read_csv(p, date_format=date_format, dayfirst=dayfirst)) for p in paths]
    parts = [p.part(split) for p in prepared]
    return TimeSeriesMixture(parts, [p.series.name for p in prepared], window, seed, mixture), prepared
