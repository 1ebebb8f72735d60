"""Time-series data: CSV reading and repair, standard splits, train-only scaling, windows, mixtures."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from moekit.data.timeseries import (
    DataWarning,
    StandardScaler,
    TimeSeriesMixture,
    check_length,
    gather_windows,
    prepare,
    read_csv,
    split_bounds,
    window_starts,
)
from moekit.errors import DataError, MoekitError

SHARED = Path(__file__).parents[1] / ".." / "shared" / "data" / "timeseries"


def write(tmp_path: Path, text: str, name: str = "s.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_read_csv_dates_channels_and_frequency(tmp_path):
    p = write(tmp_path, "date,a,b\n2020-01-01 00:00:00,1,10\n2020-01-01 01:00:00,2,20\n2020-01-01 02:00:00,3,30\n")
    s = read_csv(p)
    assert s.channels == ["a", "b"] and s.date_column == "date"
    np.testing.assert_array_equal(s.values_TC, [[1, 10], [2, 20], [3, 30]])
    assert s.values_TC.dtype == np.float32
    assert s.frequency() == np.timedelta64(3600, "s")
    assert s.future_timestamps(2) == ["2020-01-01 03:00:00", "2020-01-01 04:00:00"]


def test_read_csv_other_date_format_and_no_date(tmp_path):
    s = read_csv(write(tmp_path, "day,x\n2021/03/01,1\n2021/03/02,2\n"))
    assert s.date_column == "day" and s.future_timestamps(1) == ["2021/03/03"]
    s = read_csv(write(tmp_path, "x,y\n1,2\n3,4\n", "nodate.csv"))
    assert s.timestamps is None and s.channels == ["x", "y"]
    assert s.future_timestamps(2) == ["2", "3"]  # step indices continue


def test_non_numeric_columns_are_named_and_skipped(tmp_path):
    p = write(tmp_path, "date,city,v,note\n2020-01-01,Oslo,1,x\n2020-01-02,Rome,2,y\n")
    with pytest.warns(DataWarning, match="city, note"):
        s = read_csv(p)
    assert s.channels == ["v"]


def test_missing_values_filled_with_count(tmp_path):
    # a: missing at the start (nearest value) and inside (linear interpolation); b: missing at the end
    rows = ["date,a,b"] + [f"2020-01-{d:02d},{a},{b}" for d, a, b in zip(
        range(1, 16), ["", 2, 3, "", "", 9, 10, 11, 12, 13, 14, 15, 16, 17, 18],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, "NaN"])]
    with pytest.warns(DataWarning, match=r"filled 4 missing value\(s\) in a \(3\), b \(1\) by linear interpolation"):
        s = read_csv(write(tmp_path, "\n".join(rows) + "\n"))
    np.testing.assert_array_equal(s.values_TC[:6, 0], [2, 2, 3, 5, 7, 9])  # 3 -> 9 over three steps; 20% filled
    np.testing.assert_array_equal(s.values_TC[-3:, 1], [13, 14, 14])


def test_a_column_missing_past_the_stated_fraction_is_refused_naming_it(tmp_path):
    p = write(tmp_path, "date,a,b\n2020-01-01,,1\n2020-01-02,2,2\n2020-01-03,,3\n2020-01-04,4,4\n")
    with pytest.raises(DataError, match=r"column 'a' is 50% missing \(2 of 4 cells\), more than the 20%"):
        read_csv(p)
    s = read_csv(p, channels="b")  # leaving it out with --columns works
    assert s.channels == ["b"]


def test_no_numeric_column_is_one_clear_error(tmp_path):
    p = write(tmp_path, "date,name\n2020-01-01,a\n2020-01-02,b\n")
    with pytest.raises(DataError, match="no numeric column") as e:
        read_csv(p)
    assert "date, name" in str(e.value)
    with pytest.raises(DataError, match="does not exist"):
        read_csv(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="no data rows"):
        read_csv(write(tmp_path, "date,a\n", "empty.csv"))


def test_standard_splits():
    s = split_bounds(17420, "ETTh1")
    assert (s.train, s.val, s.test) == ((0, 8640), (8640, 11520), (11520, 14400))
    s = split_bounds(69680, "ETTm1")
    assert (s.train, s.val, s.test) == ((0, 34560), (34560, 46080), (46080, 57600))
    s = split_bounds(1000, "weather")
    assert (s.train, s.val, s.test) == ((0, 700), (700, 800), (800, 1000))
    with pytest.raises(DataError, match="needs 14400"):
        split_bounds(5000, "ETTh2")


def test_scaler_is_fitted_on_train_only():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, (700, 2)), rng.normal(5, 3, (300, 2))]).astype(np.float32)
    from moekit.data.timeseries import Series

    p = prepare(Series("x", values, ["a", "b"]))
    np.testing.assert_allclose(p.part("train").mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(p.part("train").std(0), 1, atol=1e-4)
    assert p.part("test").mean() > 3  # the test split keeps its shift: no leakage of its statistics
    sc = StandardScaler().fit(values[:700])
    np.testing.assert_allclose(sc.inverse_transform(sc.transform(values)), values, rtol=1e-5, atol=1e-5)


def test_windows_follow_the_protocol():
    values = np.arange(200, dtype=np.float32).reshape(100, 2)
    starts = window_starts((60, 100), context=16, horizon=8)
    assert starts[0] == 60 and starts[-1] == 92 and len(starts) == 40 - 8 + 1
    x, y = gather_windows(values, starts[[0, -1]], 16, 8)
    assert x.shape == (2, 2, 16) and y.shape == (2, 2, 8)
    np.testing.assert_array_equal(x[0, 1], values[44:60, 1])
    np.testing.assert_array_equal(y[1, 0], values[92:100, 0])
    assert len(window_starts((60, 100), 16, 8, stride=5)) == 7


def test_length_errors_name_both_lengths():
    with pytest.raises(DataError, match=r"has 100 time steps.*context \+ horizon = 96 \+ 24 = 120"):
        check_length(100, 96, 24)
    with pytest.raises(DataError, match="horizon=0"):
        check_length(100, 10, 0)


def test_mixture_is_a_pure_function_of_the_step():
    a = np.arange(300, dtype=np.float32).reshape(100, 3)
    b = -np.arange(50, dtype=np.float32)[:, None]
    m = TimeSeriesMixture([a, b], ["a", "b"], window=20, seed=3)
    np.testing.assert_array_equal(m.batch(7, 8), m.batch(7, 8))
    assert not np.array_equal(m.batch(7, 8), m.batch(8, 8))
    batch = m.batch(0, 256)
    assert batch.shape == (256, 20)
    assert np.all(np.diff(batch, axis=1) != 0)  # contiguous windows of one channel each
    from_b = (batch < 0).any(axis=1).mean()
    assert abs(from_b - m.probs[1]) < 0.1  # series drawn by size
    with pytest.raises(MoekitError, match="shorter than the training window of 60"):
        TimeSeriesMixture([a, b], ["a", "b"], window=60)
    np.testing.assert_allclose(TimeSeriesMixture([a, b], ["a", "b"], window=20, mixture="equal").probs, [0.5, 0.5])
    with pytest.raises(DataError, match="accepted values are size, equal"):
        TimeSeriesMixture([a, b], ["a", "b"], window=20, mixture="bogus")


@pytest.mark.skipif(not (SHARED / "ETTh1.csv").is_file(), reason="needs ../shared/data/timeseries/ETTh1.csv")
def test_real_etth1():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean file produces no repair warning
        s = read_csv(SHARED / "ETTh1.csv")
    assert s.values_TC.shape == (17420, 7) and s.channels[-1] == "OT"
    p = prepare(s)
    assert p.splits.test == (11520, 14400)
    assert len(window_starts(p.splits.test, 512, 96)) == 2880 - 96 + 1


AMBIGUOUS = "date,x\n03/04/2020,1\n04/04/2020,2\n05/04/2020,3\n"  # 3-5 April day-first, 4 March-4 May month-first


def test_ambiguous_day_month_dates_are_refused_naming_the_column_and_both_options(tmp_path):
    with pytest.raises(DataError) as e:
        read_csv(write(tmp_path, AMBIGUOUS))
    msg = str(e.value)
    assert "column 'date'" in msg and "ambiguous" in msg
    assert "--dayfirst" in msg and "--date-format" in msg
    assert "'03/04/2020' is 2020-03-04 or 2020-04-03" in msg
    assert "\n" not in msg


def test_dayfirst_and_date_format_give_the_dates_they_name(tmp_path):
    p = write(tmp_path, AMBIGUOUS)
    s = read_csv(p, dayfirst=True)
    np.testing.assert_array_equal(s.timestamps, np.array(["2020-04-03", "2020-04-04", "2020-04-05"], dtype="datetime64[s]"))
    assert s.future_timestamps(2) == ["06/04/2020", "07/04/2020"]  # daily, written day-first like the file
    s = read_csv(p, date_format="%m/%d/%Y")
    np.testing.assert_array_equal(s.timestamps, np.array(["2020-03-04", "2020-04-04", "2020-05-04"], dtype="datetime64[s]"))
    s = read_csv(write(tmp_path, "when,x\n01/02/2021 10:30,1\n01/02/2021 11:30,2\n", "t.csv"), dayfirst=True)
    np.testing.assert_array_equal(s.timestamps, np.array(["2021-02-01T10:30", "2021-02-01T11:30"], dtype="datetime64[s]"))
    assert s.future_timestamps(1) == ["01/02/2021 12:30"]


def test_unambiguous_dates_need_no_option(tmp_path):
    # the first cell reads both ways, a later one only day-first: the whole column decides
    s = read_csv(write(tmp_path, "date,x\n12/04/2020,1\n13/04/2020,2\n"))
    np.testing.assert_array_equal(s.timestamps, np.array(["2020-04-12", "2020-04-13"], dtype="datetime64[s]"))
    s = read_csv(write(tmp_path, "date,x\n04/12/2020,1\n04/13/2020,2\n", "m.csv"))
    np.testing.assert_array_equal(s.timestamps, np.array(["2020-04-12", "2020-04-13"], dtype="datetime64[s]"))
    # year-first dates are year-month-day, never year-day-month, even with every day <= 12
    s = read_csv(write(tmp_path, "date,x\n2020-03-04,1\n2020-03-05,2\n", "iso.csv"), dayfirst=True)
    np.testing.assert_array_equal(s.timestamps, np.array(["2020-03-04", "2020-03-05"], dtype="datetime64[s]"))
    # same dates either way (day == month): nothing to ask
    s = read_csv(write(tmp_path, "date,x\n01/01/2020,1\n02/02/2020,2\n", "same.csv"))
    np.testing.assert_array_equal(s.timestamps, np.array(["2020-01-01", "2020-02-02"], dtype="datetime64[s]"))


def test_date_options_that_do_not_fit_are_clear_errors(tmp_path):
    p = write(tmp_path, "date,x\n04/25/2020,1\n04/26/2020,2\n")
    with pytest.raises(DataError, match=r"column 'date' does not read day-first.*'04/25/2020'"):
        read_csv(p, dayfirst=True)
    with pytest.raises(DataError, match=r"column 'date' does not match --date-format '%d/%m/%Y' \(e.g. '04/25/2020'\)"):
        read_csv(p, date_format="%d/%m/%Y")


def test_pandas_reader_keeps_the_repairs_and_errors(tmp_path):
    # blank lines and all-blank rows are dropped; short rows are missing cells; a BOM and padded names are cleaned
    p = write(tmp_path, "\ufeffdate, a ,b\n2020-01-01,1,2\n\n,,\n2020-01-02,3\n2020-01-03,5,6\n")
    with pytest.warns(DataWarning, match="filled 1 missing value"):
        s = read_csv(p)
    assert s.channels == ["a", "b"] and s.length == 3
    np.testing.assert_array_equal(s.values_TC, [[1, 2], [3, 4], [5, 6]])  # b: halfway between 2 and 6
    with pytest.raises(DataError, match="is empty"):
        read_csv(write(tmp_path, "", "blank.csv"))
    with pytest.raises(DataError, match="not a readable CSV file"):
        read_csv(write(tmp_path, "date,a\n2020-01-01,1\n2020-01-02,2,3\n", "long.csv"))
    bad = tmp_path / "bin.csv"
    bad.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(DataError, match="not a text CSV file"):
        read_csv(bad)


@pytest.mark.skipif(not (SHARED / "ETTm1.csv").is_file(), reason="needs ../shared/data/timeseries/ETT*.csv")
def test_real_ett_timestamps_hourly_and_15_minute():
    h = read_csv(SHARED / "ETTh1.csv")
    assert h.timestamps[0] == np.datetime64("2016-07-01T00:00:00") and h.timestamps[1] == np.datetime64("2016-07-01T01:00:00")
    assert h.frequency() == np.timedelta64(3600, "s") and h.date_format == "%Y-%m-%d %H:%M:%S"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = read_csv(SHARED / "ETTm1.csv")
    assert m.values_TC.shape == (69680, 7)
    assert m.timestamps[1] == np.datetime64("2016-07-01T00:15:00") and m.frequency() == np.timedelta64(900, "s")
    assert m.future_timestamps(1) == [str(m.timestamps[-1] + np.timedelta64(15, "m")).replace("T", " ")]


# ---------------------------------------------------------------- any CSV a user has (issue 24)


def daily(n: int, start: str = "2021-01-01") -> list[str]:
    return [str(np.datetime64(start) + np.timedelta64(i, "D")) for i in range(n)]


def test_tab_and_semicolon_separated_files_are_read(tmp_path):
    tab = write(tmp_path, "date\ta\tb\n2021-01-01\t1.5\t10\n2021-01-02\t2.5\t20\n", "tab.tsv")
    s = read_csv(tab)
    assert s.channels == ["a", "b"]
    np.testing.assert_array_equal(s.values_TC, [[1.5, 10], [2.5, 20]])
    # semicolon files often write decimals with a comma
    semi = write(tmp_path, "date;a;b\n2021-01-01;1,5;10\n2021-01-02;-2,25;20\n", "semi.csv")
    s = read_csv(semi)
    assert s.channels == ["a", "b"] and s.frequency() == np.timedelta64(1, "D")
    np.testing.assert_array_equal(s.values_TC, [[1.5, 10], [-2.25, 20]])


def test_a_header_that_is_not_utf8_is_read_as_windows_1252_with_a_warning(tmp_path):
    p = tmp_path / "latin1.csv"
    p.write_bytes("date;caf\xe9;d\xfcnn\n2020-01-01;1;2\n2020-01-02;3;4\n".encode("latin-1"))
    with pytest.warns(DataWarning, match=r"latin1.csv is not UTF-8 \(first non-UTF-8 byte on line 1\): read as Windows-1252"):
        s = read_csv(p)
    assert s.channels == ["café", "dünn"]
    np.testing.assert_array_equal(s.values_TC, [[1, 2], [3, 4]])
    u16 = tmp_path / "u16.csv"
    u16.write_bytes("date,x\n2020-01-01,5\n2020-01-02,6\n".encode("utf-16"))
    with pytest.warns(DataWarning, match="read as UTF-16"):
        assert read_csv(u16).values_TC[:, 0].tolist() == [5, 6]
    no_bom = tmp_path / "u16le.csv"
    no_bom.write_bytes("date,x\n2020-01-01,5\n".encode("utf-16-le"))
    with pytest.raises(DataError, match=r"not a text CSV file \(it holds NUL bytes.*accepted: UTF-8"):
        read_csv(no_bom)


def test_a_text_cell_in_a_numeric_column_is_missing_not_the_end_of_the_column(tmp_path):
    rows = [f"{d},{v},{w},north" for d, v, w in zip(daily(10), [1, 2, "n/a?", 4, 5, 6, 7, 8, 9, 10],
                                                   ["x", "y", "z", "q", 1, "w", "e", "r", "t", "u"])]
    p = write(tmp_path, "date,load,mostly_text,site\n" + "\n".join(rows) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = read_csv(p)
    messages = [str(w.message) for w in caught]
    assert s.channels == ["load"]
    np.testing.assert_array_equal(s.values_TC[:, 0], np.arange(1, 11))  # the cell between 2 and 4 is filled as 3
    assert any("column 'load': 1 cell(s) that are not numbers read as missing (e.g. 'n/a?')" in m for m in messages)
    assert any("skipped non-numeric column(s) mostly_text, site" in m for m in messages)
    with pytest.raises(DataError, match=r"column 'mostly_text' is not numeric \(9 of 10 present cells are text"):
        read_csv(p, channels=["load", "mostly_text"])


def test_columns_option_chooses_the_channels_and_names_unknown_ones(tmp_path):
    p = write(tmp_path, "date,a,b,c\n2021-01-01,1,2,3\n2021-01-02,4,5,6\n")
    s = read_csv(p, channels="c,a")
    assert s.channels == ["c", "a"]
    np.testing.assert_array_equal(s.values_TC, [[3, 1], [6, 4]])
    with pytest.raises(DataError, match=r"has no column\(s\) 'x', 'y'; its columns are a, b, c"):
        read_csv(p, channels=["a", "x", "y"])
    with pytest.raises(DataError, match="column 'date' holds the dates"):
        read_csv(p, channels=["date"])


def test_an_infinite_cell_is_missing_and_filled(tmp_path):
    vals = [1, 2, 3, "inf", 5, 6, "-1e39", 8, 9, 10]  # -1e39 is finite in float64, -inf in float32
    p = write(tmp_path, "date,a,b\n" + "\n".join(f"{d},{v},{i}" for i, (d, v) in enumerate(zip(daily(10), vals))) + "\n")
    with pytest.warns(DataWarning, match=r"column 'a': 2 infinite value\(s\) read as missing"):
        s = read_csv(p)
    assert np.isfinite(s.values_TC).all()
    np.testing.assert_array_equal(s.values_TC[:, 0], np.arange(1, 11))  # 4 = halfway between 3 and 5
    p2 = write(tmp_path, "date,a\n2021-01-01,1e400\n2021-01-02,-inf\n", "allinf.csv")
    with pytest.raises(DataError, match=r"column 'a' is 100% missing"):
        read_csv(p2)


def test_constant_channels_are_kept_named_and_scale_to_zero(tmp_path):
    p = write(tmp_path, "date,flat,v\n" + "\n".join(f"{d},3.5,{i}" for i, d in enumerate(daily(20))) + "\n")
    with pytest.warns(DataWarning, match=r"constant column\(s\) flat \(always 3.5\) kept"):
        s = read_csv(p)
    prepared = prepare(s)
    assert np.isfinite(prepared.scaled_TC).all()
    np.testing.assert_array_equal(prepared.scaled_TC[:, 0], 0)  # (3.5 - 3.5) / 1: the std is clamped, not 0
    np.testing.assert_allclose(prepared.scaler.inverse_transform(prepared.scaled_TC)[:, 0], 3.5)


def test_prepare_refuses_non_finite_values():
    from moekit.data.timeseries import Series

    with pytest.raises(DataError, match=r"channel\(s\) b hold NaN or infinite"):
        prepare(Series("x", np.array([[1, 2], [3, np.inf]] * 5, np.float32), ["a", "b"]))


def test_newest_first_is_sorted_by_date(tmp_path):
    days = daily(5)
    p = write(tmp_path, "date,v\n" + "\n".join(f"{d},{i}" for i, d in reversed(list(enumerate(days)))) + "\n")
    with pytest.warns(DataWarning, match=r"rows are newest first: reversed by date.*\('2021-01-05 00:00:00'\)"):
        s = read_csv(p)
    np.testing.assert_array_equal(s.values_TC[:, 0], [0, 1, 2, 3, 4])
    assert s.timestamps[-1] == np.datetime64("2021-01-05") and s.future_timestamps(1) == ["2021-01-06"]
    shuffled = write(tmp_path, "date,v\n2021-01-02,2\n2021-01-01,1\n2021-01-03,3\n", "shuffled.csv")
    with pytest.warns(DataWarning, match="not in time order: sorted"):
        np.testing.assert_array_equal(read_csv(shuffled).values_TC[:, 0], [1, 2, 3])


def test_duplicated_timestamps_are_refused_naming_the_first(tmp_path):
    p = write(tmp_path, "date,v\n2021-01-01,1\n2021-01-02,2\n2021-01-02,3\n2021-01-03,4\n2021-01-03,5\n")
    with pytest.raises(DataError, match=r"duplicated timestamps: '2021-01-02 00:00:00' is on data rows 2, 3 "
                                        r"\(1 more timestamp\(s\) repeat\)"):
        read_csv(p)


def test_irregular_steps_are_warned_and_the_most_common_step_continues(tmp_path):
    stamps = ["2021-01-01 00:00", "2021-01-01 01:00", "2021-01-01 02:00", "2021-01-01 04:00", "2021-01-01 05:00"]
    p = write(tmp_path, "time,v\n" + "\n".join(f"{t},{i}" for i, t in enumerate(stamps)) + "\n")
    with pytest.warns(DataWarning, match=r"irregular steps between timestamps \(1 of 4 differ from the most common, "
                                         r"1 hour\).*every 1 hour"):
        s = read_csv(p)
    assert s.future_timestamps(2) == ["2021-01-01 06:00", "2021-01-01 07:00"]


def test_weekly_daily_and_monthly_timestamps_continue(tmp_path):
    weeks = [str(np.datetime64("2020-01-05") + np.timedelta64(7 * i, "D")) for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # regular weekly data: no warning
        s = read_csv(write(tmp_path, "week,v\n" + "\n".join(f"{w},{i}" for i, w in enumerate(weeks)) + "\n"))
    assert s.frequency() == np.timedelta64(7, "D") and s.future_timestamps(2) == ["2020-02-16", "2020-02-23"]
    s = read_csv(write(tmp_path, "date,v\n" + "\n".join(f"{d},{i}" for i, d in enumerate(daily(3))) + "\n", "d.csv"))
    assert s.future_timestamps(1) == ["2021-01-04"]
    months = ["2021-01-31", "2021-02-28", "2021-03-31", "2021-04-30"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # month ends are 28-31 days apart: regular, not irregular
        s = read_csv(write(tmp_path, "date,v\n" + "\n".join(f"{m},{i}" for i, m in enumerate(months)) + "\n", "m.csv"))
    assert s.month_step() == 1 and s.future_timestamps(2) == ["2021-05-31", "2021-06-30"]
    firsts = ["2020-01-01", "2020-04-01", "2020-07-01"]
    s = read_csv(write(tmp_path, "date,v\n" + "\n".join(f"{m},{i}" for i, m in enumerate(firsts)) + "\n", "q.csv"))
    assert s.month_step() == 3 and s.future_timestamps(1) == ["2020-10-01"]


def test_forecast_context_allows_short_series_down_to_the_minimum():
    from moekit.data.timeseries import MIN_CONTEXT, forecast_context

    assert MIN_CONTEXT == 4
    assert forecast_context(5, 5) == 5 and forecast_context(5, None) == 5 and forecast_context(2000, None) == 512
    with pytest.raises(DataError, match=r"has 3 time step\(s\): a forecast needs at least 4 points"):
        forecast_context(3, None)
    with pytest.raises(DataError, match=r"--context 3 is too short"):
        forecast_context(10, 3)
    with pytest.raises(DataError, match=r"has 10 time steps, fewer than --context 20: use --context 10 or less"):
        forecast_context(10, 20)


def test_window_errors_say_which_split_is_short_and_what_to_change():
    # a 966-row weekly file, 70/10/20: train [0, 676); with context 512 only 164 rows can be targets
    with pytest.raises(DataError, match=r"split \[0, 676\) holds 676 rows, of which 164 can be targets after the "
                                        r"first context of 512: fewer than horizon = 192; use --context 484 or less"):
        window_starts((0, 676), 512, 192)
    with pytest.raises(DataError, match=r"split \[676, 773\) holds 97 rows, fewer than horizon = 192: use a shorter"):
        window_starts((676, 773), 512, 192)


def test_excel_sep_line_and_quoted_thousands_are_read(tmp_path):
    s = read_csv(write(tmp_path, "sep=;\r\ndate;a\r\n2021-01-01;1,25\r\n2021-01-02;2,5\r\n", "excel.csv"))
    assert s.channels == ["a"]
    np.testing.assert_array_equal(s.values_TC[:, 0], [1.25, 2.5])
    s = read_csv(write(tmp_path, 'date,a,b\n2021-01-01,"1,234.5",7\n2021-01-02,"-12,000",8\n', "k.csv"))
    np.testing.assert_array_equal(s.values_TC, [[1234.5, 7], [-12000, 8]])
    s = read_csv(write(tmp_path, "date|a\n2021-01-01|3\n2021-01-02|4\n", "pipe.csv"))
    np.testing.assert_array_equal(s.values_TC[:, 0], [3, 4])


def test_a_saved_index_column_is_skipped_and_repeated_names_are_refused(tmp_path):
    with pytest.warns(DataWarning, match="skipped column 'Unnamed: 0': an unnamed column of row numbers"):
        s = read_csv(write(tmp_path, ",date,v\n0,2021-01-01,5\n1,2021-01-02,6\n2,2021-01-03,7\n", "idx.csv"))
    assert s.channels == ["v"] and s.date_column == "date"
    with pytest.raises(DataError, match="names column\\(s\\) 'a' more than once"):
        read_csv(write(tmp_path, "date,a,a\n2021-01-01,1,2\n", "dup.csv"))


def test_a_series_shorter_than_the_training_window_names_train_seq_len():
    a = np.zeros((100, 1), np.float32)
    b = np.zeros((50, 1), np.float32)
    with pytest.raises(DataError, match=r"shorter than the training window of 60 time steps: b \(50 rows\); use a "
                                        r"shorter context \(train.seq_len=49 or less\)"):
        TimeSeriesMixture([a, b], ["a", "b"], window=60)
