"""A user's CSV as cells and numeric channels: encodings, separators, text cells, gaps, constant columns.

Holds the rules `moekit.data.timeseries.read_csv` applies to any CSV a user
has, each problem named once (a `DataError` when refused, a `DataWarning` when
repaired):

- encodings: UTF-8 (with or without a byte-order mark), UTF-16 with a
  byte-order mark, else Windows-1252, else Latin-1 (both warned, naming the
  encoding used); a file with NUL bytes and no UTF-16 mark is refused;
- separators: comma, tab, semicolon (or pipe), sniffed from the header and the first
  rows, or named by Excel's `sep=;` first line (a semicolon or tab file may
  write decimals with a comma: 1,5; a comma file may quote thousands: "1,234.5");
- numbers: pandas' parser; cells such as '', 'NA', 'n/a', '?' are missing;
  other text cells in a numeric column become missing (counted, the column
  named); a column whose present cells are more than half text is skipped and
  named; ±inf (and numbers past float range) become missing;
- gaps: linear interpolation between the nearest present values, the nearest
  present value at either end; a column more than `MAX_MISSING` (20%) missing
  is refused naming it and its fraction (one missing cell is always filled);
- constant columns are kept and named (they scale to 0; the scaler's std is
  clamped, so nothing divides by zero).

Not here: dates and row order (`moekit.data.dates`), the `Series` and splits
(`moekit.data.timeseries`).
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import warnings
from pathlib import Path

import numpy as np

from ..errors import DataError

MISSING = {"", "nan", "na", "n/a", "null", "none", "?", "-", "#n/a", "nat"}
SEPARATORS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
MAX_MISSING = 0.2  # the largest fraction of a column that is filled; above it the column is refused
MOSTLY_TEXT = 0.5  # a column whose present cells are more than this fraction text is not numeric
FILL_RULE = "linear interpolation between neighbours, nearest value at the ends"
_DECIMAL_COMMA = re.compile(r"^[+-]?\d*,\d+([eE][+-]?\d+)?$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")  # 1,234,567.5 in a comma-separated file (quoted)
_EXCEL_SEP = re.compile(r"^\ufeff?sep=([,;\t|])\r?\n")


class DataWarning(UserWarning):
    """Input data that was usable after a repair (filled gaps, skipped columns, another encoding)."""


def warn(message: str, notes: list[str]) -> None:
    notes.append(message)
    warnings.warn(message, DataWarning, stacklevel=3)


# ---------------------------------------------------------------- text


def decode(raw: bytes, name: str, notes: list[str]) -> str:
    """The file's text: UTF-8, UTF-16 with a BOM, else cp1252 or latin-1 with a warning; binary is refused."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = raw.decode("utf-16")
        except UnicodeDecodeError:
            raise DataError(f"{name} starts with a UTF-16 byte-order mark but is not UTF-16 text; "
                            f"save it as UTF-8 text") from None
        warn(f"{name}: read as UTF-16 (it is not UTF-8)", notes)
        return text
    if b"\x00" in raw:
        raise DataError(f"{name} is not a text CSV file (it holds NUL bytes: a binary file, or UTF-16 without a "
                        f"byte-order mark); accepted: UTF-8, UTF-16 with a byte-order mark, Windows-1252 or Latin-1 "
                        f"text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        where = e.start
    for encoding, label in (("cp1252", "Windows-1252 (cp1252)"), ("latin-1", "Latin-1 (ISO-8859-1)")):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        line = raw[:where].count(b"\n") + 1
        warn(f"{name} is not UTF-8 (first non-UTF-8 byte on line {line}): read as {label}", notes)
        return text
    raise DataError(f"{name} is not a text CSV file")  # latin-1 decodes any byte: not reached


def sniff_separator(text: str) -> str:
    """Comma, tab, semicolon or pipe: the one that splits the header and the next rows into the same number of
    fields most often (more fields break a tie); comma when none splits the header."""
    lines = [ln for ln in text.splitlines()[:21] if ln.strip()]
    if not lines:
        return ","
    best, best_score = ",", (0, 0)
    for sep in SEPARATORS:
        fields = [len(next(csv.reader([ln], delimiter=sep))) for ln in lines]
        if fields[0] < 2:
            continue
        score = (sum(n == fields[0] for n in fields[1:]), fields[0])
        if score > best_score:
            best, best_score = sep, score
    return best


def read_cells(p: Path, notes: list[str]):
    """The CSV as a DataFrame of stripped strings (all-blank rows dropped), and its separator."""
    import pandas as pd

    text = decode(p.read_bytes(), p.name, notes)
    if not text.strip():
        raise DataError(f"{p} is empty: expected a header row (a date column plus numeric channels)")
    declared = _EXCEL_SEP.match(text)
    if declared:  # Excel's "sep=;" first line names the separator
        text = text[declared.end():]
    sep = declared.group(1) if declared else sniff_separator(text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # rows longer than the header
            df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, index_col=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{p} is empty: expected a header row (a date column plus numeric channels)") from None
    except (pd.errors.ParserError, pd.errors.ParserWarning) as e:
        raise DataError(f"{p} is not a readable CSV file ({SEPARATORS[sep]}-separated): {str(e).strip()}") from None
    header = [h.strip() for h in next(csv.reader(io.StringIO(text), delimiter=sep))]
    dup = sorted({h for h in header if h and header.count(h) > 1})  # pandas would rename the second 'a' 'a.1'
    df.columns = [str(h).strip() for h in df.columns]
    if dup:
        raise DataError(f"{p.name} names column(s) {', '.join(map(repr, dup))} more than once; give each a unique name")
    cells = df.fillna("").apply(lambda col: col.str.strip())
    cells = cells[(cells != "").any(axis=1)]
    if cells.empty:
        raise DataError(f"{p} has a header but no data rows")
    return cells, sep


# ---------------------------------------------------------------- numbers


class Column:
    """One column's cells read as numbers: values (NaN where missing) and what was not a number."""

    def __init__(self, cells, decimal_comma: bool) -> None:
        import pandas as pd

        s = pd.Series(cells, dtype=str).str.strip()
        self.missing = s.str.lower().isin(MISSING).to_numpy()
        if decimal_comma:
            s = s.where(~s.str.match(_DECIMAL_COMMA), s.str.replace(",", ".", regex=False))
        else:
            s = s.where(~s.str.match(_THOUSANDS), s.str.replace(",", "", regex=False))
        values = pd.to_numeric(s.where(~self.missing), errors="coerce").to_numpy(dtype=np.float64, copy=True)
        self.text = np.isnan(values) & ~self.missing
        self.examples = list(dict.fromkeys(s[self.text].tolist()))[:3]
        with np.errstate(invalid="ignore"):  # beyond float32 (the model's dtype) is infinite there
            self.infinite = np.isinf(values) | (np.abs(values) > np.finfo(np.float32).max)
        values[self.infinite] = np.nan
        self.values = values

    @property
    def present(self) -> int:
        return int((~self.missing).sum())

    def is_numeric(self) -> bool:
        return self.present > 0 and self.text.sum() <= MOSTLY_TEXT * self.present


def numeric_columns(cells, wanted: list[str], explicit: bool, sep: str, name: str,
                    notes: list[str]) -> dict[str, np.ndarray]:
    """Each wanted column that is numeric (text cells and ±inf read as missing, each named); others skipped, named.

    None numeric is an error naming the columns. With `explicit` (the user chose the columns) a column that is not numeric is an error.
    """
    out, skipped = {}, []
    for col in wanted:
        column = Column(cells[col].tolist(), decimal_comma=sep != ",")
        if not explicit and _row_numbers(col, column.values):
            warn(f"{name}: skipped column {col!r}: an unnamed column of row numbers (an index written with the data)",
                 notes)
            continue
        if not column.is_numeric():
            if explicit:
                raise DataError(f"{name}: column {col!r} is not numeric ({int(column.text.sum())} of "
                                f"{column.present} present cells are text, e.g. {column.examples[:1]}); "
                                f"choose numeric columns with --columns")
            skipped.append(col)
            continue
        if column.text.any():
            warn(f"{name}: column {col!r}: {int(column.text.sum())} cell(s) that are not numbers read as missing "
                 f"(e.g. {', '.join(map(repr, column.examples))})", notes)
        if column.infinite.any():
            warn(f"{name}: column {col!r}: {int(column.infinite.sum())} infinite value(s) read as missing (inf, or past float32's ±3.4e38)", notes)
        out[col] = column.values
    if not out:
        raise DataError(f"{name} has no numeric column: expected a date column plus numeric channels, got columns "
                        f"{', '.join(cells.columns)}")
    if skipped:
        warn(f"{name}: skipped non-numeric column(s) {', '.join(skipped)} (more than half of their cells are text "
             f"or empty)", notes)
    return out


def _row_numbers(col: str, values: np.ndarray) -> bool:
    """An unnamed column (pandas calls it 'Unnamed: 0') holding 0, 1, 2, ... or 1, 2, 3, ...: a saved index."""
    return (col.startswith("Unnamed: ") and len(values) > 1
            and bool(np.array_equal(values, np.arange(len(values)) + values[0])) and values[0] in (0, 1))


def fill_missing(columns: dict[str, np.ndarray], name: str, notes: list[str]) -> None:
    """Fill NaNs in place by `FILL_RULE`; refuse a column more than `MAX_MISSING` missing, naming it."""
    counts = {}
    for col, values in columns.items():
        nan = np.isnan(values)
        n = int(nan.sum())
        if not n:
            continue
        if n > max(1, MAX_MISSING * len(values)):
            raise DataError(f"{name}: column {col!r} is {n / len(values):.0%} missing ({n} of {len(values)} cells), "
                            f"more than the {MAX_MISSING:.0%} moekit fills; fill it yourself or leave it out "
                            f"(--columns chooses the columns to use)")
        t = np.arange(len(values))
        values[nan] = np.interp(t[nan], t[~nan], values[~nan])
        counts[col] = n
    if counts:
        per = ", ".join(f"{c} ({n})" for c, n in counts.items())
        warn(f"{name}: filled {sum(counts.values())} missing value(s) in {per} by {FILL_RULE}", notes)


def name_constant(columns: dict[str, np.ndarray], name: str, notes: list[str]) -> None:
    """Warn about channels that never change (kept: they standardise to 0 and forecast as their value)."""
    constant = [f"{c} (always {v[0]:g})" for c, v in columns.items() if len(v) and np.all(v == v[0])]
    if constant:
        warn(f"{name}: constant column(s) {', '.join(constant)} kept: they carry no pattern and forecast as "
             f"their value", notes)


def choose_columns(header: list[str], date_name: str | None, columns, name: str) -> tuple[list[str], bool]:
    """The columns to forecast: `columns` (a list or 'a,b,c') checked against the header, else all but the date."""
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",") if c.strip()]
    if not columns:
        return [c for c in header if c != date_name], False
    available = [c for c in header if c != date_name]
    unknown = [c for c in columns if c not in header]
    if unknown:
        raise DataError(f"{name} has no column(s) {', '.join(map(repr, unknown))}; its columns are "
                        f"{', '.join(available)}")
    if date_name in columns:
        raise DataError(f"{name}: column {date_name!r} holds the dates and cannot be forecast; its other columns "
                        f"are {', '.join(available)}")
    return list(dict.fromkeys(columns)), True
