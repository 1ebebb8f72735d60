"""A CSV's date column, parsed with pandas: an explicit format, or an inferred one that must be unambiguous.

Holds `parse_dates` (cells -> datetime64[s] timestamps and the strftime format
they came in), `date_readings` (every format the cells fully parse in),
`time_order` (rows out of time order sorted and warned, duplicated timestamps
refused, irregular steps warned) and calendar-month steps (`month_step`,
`add_months`) for monthly, quarterly and yearly data.
The format is `date_format` when given; else pandas guesses it from the first
cell, and the guess with day and month swapped is tried too. When both readings parse every cell and give
different dates (03/04/2020 with no day above 12), the column is ambiguous and
is refused unless `dayfirst` (or an explicit format) says which it is.
Year-first dates (2020-03-04) are read year-month-day only.

Not here: reading the CSV itself, numeric channels, gap repairs
(`moekit.data.ts_csv`, `moekit.data.timeseries`).
"""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import DataError
from .ts_csv import warn

ISO_FORMAT = "%Y-%m-%dT%H:%M:%S"  # how continued timestamps are written when pandas' ISO 8601 parser was needed


def parse_dates(cells: list[str], date_format: str | None = None, dayfirst: bool = False,
                where: str = "the date column") -> tuple[np.ndarray | None, str | None]:
    """datetime64[s] values and their strftime format, or (None, None) when the cells are not dates.

    An explicit `date_format` that does not fit every cell is an error, as are
    ambiguous dates without `dayfirst` and dates that do not read day-first with it.
    """
    cells = [c.strip() for c in cells]
    if not cells or any(not c for c in cells):
        return None, None
    if date_format:
        stamps = _parse(cells, date_format)
        if stamps is None:
            bad = _first_misfit(cells, date_format)
            raise DataError(f"{where} does not match --date-format {date_format!r} (e.g. {bad!r}); "
                            f"give the strftime format of its dates, such as '%Y-%m-%d %H:%M:%S' or '%d/%m/%Y'")
        return stamps, date_format
    candidates = _candidate_formats(cells[0])
    readings = date_readings(cells, candidates)
    if not readings:
        return None, None
    day_first = [f for f in readings if _day_before_month(f)]
    if dayfirst:
        if day_first:
            return readings[day_first[0]], day_first[0]
        wanted = [f for f in candidates if _day_before_month(f)]
        if wanted:
            raise DataError(f"{where} does not read day-first, as --dayfirst asks (e.g. "
                            f"{_first_misfit(cells, wanted[0])!r}); drop --dayfirst or pass --date-format FMT")
    if len(readings) > 1:
        (fmt_a, a), (fmt_b, b) = list(readings.items())[:2]
        differ = np.flatnonzero(a != b)
        if differ.size:
            i = int(differ[0])
            (mf_fmt, mf), (_, df) = sorted([(fmt_a, a), (fmt_b, b)], key=lambda r: _day_before_month(r[0]))
            raise DataError(
                f"{where} holds ambiguous dates: they read both month-first and day-first "
                f"({cells[i]!r} is {_day(mf[i])} or {_day(df[i])}); pass --dayfirst for day-first dates, "
                f"or --date-format FMT with their format (e.g. --date-format '{mf_fmt}' for month-first)")
    fmt = next((f for f in readings if not _day_before_month(f)), next(iter(readings)))
    return readings[fmt], fmt


def date_readings(cells: list[str], candidates: list[str] | None = None) -> dict[str, np.ndarray]:
    """Each candidate format (default: guessed from the first cell) that parses every cell, with its values.

    Falls back to pandas' ISO 8601 parser when no guessed format fits.
    """
    cells = [c.strip() for c in cells]
    if not cells or any(not c for c in cells):
        return {}
    if candidates is None:
        candidates = _candidate_formats(cells[0])
    out = {}
    for fmt in candidates:
        stamps = _parse(cells, fmt)
        if stamps is not None:
            out[fmt] = stamps
    if not out:
        stamps = _parse(cells, "ISO8601")
        if stamps is not None:
            out[ISO_FORMAT] = stamps
    return out


def _candidate_formats(first: str) -> list[str]:
    """pandas' guesses for the first cell and their day/month swaps, month-first first; year-day-month dropped."""
    from pandas.tseries.api import guess_datetime_format

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guesses = [guess_datetime_format(first, dayfirst=dayfirst) for dayfirst in (False, True)]
    for fmt in [g for g in guesses if g]:
        swapped = fmt.replace("%d", "\0").replace("%m", "%d").replace("\0", "%m")
        for f in sorted({fmt, swapped}, key=_day_before_month):
            if f not in out and not _year_day_month(f):
                out.append(f)
    return out


def _parse(cells: list[str], fmt: str) -> np.ndarray | None:
    import pandas as pd

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            idx = pd.DatetimeIndex(pd.to_datetime(cells, format=fmt))
    except (ValueError, TypeError, OverflowError):
        return None
    if idx.tz is not None:
        idx = idx.tz_localize(None)  # keep the wall-clock time the file shows
    if idx.isna().any():
        return None
    return idx.to_numpy().astype("datetime64[s]")


def _first_misfit(cells: list[str], fmt: str) -> str:
    for cell in cells:
        if _parse([cell], fmt) is None:
            return cell
    return cells[0]


def _day_before_month(fmt: str) -> bool:
    return "%d" in fmt and "%m" in fmt and fmt.index("%d") < fmt.index("%m")


def _year_day_month(fmt: str) -> bool:
    return "%Y" in fmt and _day_before_month(fmt) and fmt.index("%Y") < fmt.index("%d")


def _day(value: np.datetime64) -> str:
    return str(value.astype("datetime64[D]"))


# ---------------------------------------------------------------- row order and steps


def time_order(stamps: np.ndarray, where: str, notes: list[str]) -> np.ndarray | None:
    """The row order that puts `stamps` in time (None when they already are); duplicates are refused.

    A file written newest first is reversed, any other disorder sorted (stable), each with a warning.
    Steps that are not all alike are warned about: future timestamps continue at the most common step.
    """
    values, counts = np.unique(stamps, return_counts=True)
    if (counts > 1).any():
        k = int(np.argmax(counts > 1))
        rows = np.flatnonzero(stamps == values[k])[:3] + 1
        more = int((counts > 1).sum()) - 1
        raise DataError(f"{where} holds duplicated timestamps: {_stamp(values[k])} is on data rows "
                        f"{', '.join(map(str, rows))}" + (f" ({more} more timestamp(s) repeat)" if more else "")
                        + "; keep one row per timestamp (or average them) and run again")
    order = None
    steps = np.diff(stamps)
    if (steps < np.timedelta64(0, "s")).any():
        newest_first = bool((steps < np.timedelta64(0, "s")).all())
        order = np.argsort(stamps, kind="stable")
        warn(f"{where}: rows are " + ("newest first: reversed" if newest_first else "not in time order: sorted")
             + f" by date, so the forecast continues from the newest ({_stamp(stamps[order[-1]])})", notes)
        steps = np.diff(stamps[order])
    if steps.size and not month_step(stamps if order is None else stamps[order]):
        step_values, step_counts = np.unique(steps, return_counts=True)
        common = step_values[np.argmax(step_counts)]
        off = int((steps != common).sum())
        if off:
            warn(f"{where}: irregular steps between timestamps ({off} of {steps.size} differ from the most common, "
                 f"{describe_step(common)}); the series is read row by row and future timestamps continue "
                 f"every {describe_step(common)}", notes)
    return order


def describe_step(step: np.timedelta64) -> str:
    """'1 hour', '15 minutes', '7 days' ..."""
    seconds = int(step / np.timedelta64(1, "s"))
    for unit, size in (("week", 604800), ("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds and seconds % size == 0:
            n = seconds // size
            return f"{n} {unit}" + ("s" if n != 1 else "")
    return f"{seconds} seconds"


def _stamp(value: np.datetime64) -> str:
    return repr(str(value.astype("datetime64[s]")).replace("T", " "))


def month_step(stamps: np.ndarray) -> int:
    """Calendar months between timestamps (1 monthly, 3 quarterly, 12 yearly) when every step is that many
    months on the same day of the month (or every stamp a month's last day) at the same time; else 0."""
    if len(stamps) < 2:
        return 0
    months = stamps.astype("datetime64[M]")
    step = np.diff(months).astype(np.int64)
    if step[0] < 1 or (step != step[0]).any():
        return 0
    days = stamps.astype("datetime64[D]")
    day_of_month = (days - months.astype("datetime64[D]")).astype(np.int64)
    month_end = days + 1 == (months + 1).astype("datetime64[D]")
    time_of_day = (stamps - days).astype(np.int64)
    same_day = (day_of_month == day_of_month[0]).all() or month_end.all()
    return int(step[0]) if same_day and (time_of_day == time_of_day[0]).all() else 0


def add_months(stamp: np.datetime64, months: int) -> np.datetime64:
    """`stamp` moved by whole calendar months (a month's last day stays the last day)."""
    import pandas as pd

    ts = pd.Timestamp(stamp)
    offset = pd.offsets.MonthEnd(months) if ts.is_month_end else pd.DateOffset(months=months)
    return np.datetime64((ts + offset).to_datetime64(), "s")
