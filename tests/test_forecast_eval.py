"""The evaluation harness: window alignment, metrics, baselines and the model adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.data.timeseries import DataWarning, Series, prepare, read_csv
from moekit.errors import DataError
from moekit.infer.forecast_eval import (
    DLinear,
    LastValue,
    ModelForecaster,
    SeasonalNaive,
    baselines,
    evaluate,
    parse_horizons,
    results_table,
    season_length,
)

SHARED = Path(__file__).parents[1] / ".." / "shared" / "data" / "timeseries"


class Extrapolate:
    """Continues the last slope: exact on a straight line, so any misaligned target shows."""

    name = "extrapolate"

    def predict_many(self, context_NL, horizons):
        slope = context_NL[:, -1:] - context_NL[:, -2:-1]
        return {h: context_NL[:n, -1:] + slope[:n] * np.arange(1, h + 1) for h, n in horizons.items()}


def hourly(values_TC: np.ndarray, name: str = "syn") -> Series:
    t = np.datetime64("2020-01-01T00:00:00") + np.arange(len(values_TC)) * np.timedelta64(3600, "s")
    return Series(name, values_TC.astype(np.float32), [f"c{i}" for i in range(values_TC.shape[1])], t)


def test_targets_are_aligned_with_contexts():
    t = np.arange(1000, dtype=np.float64)
    p = prepare(hourly(np.stack([t, 3 * t + 5], axis=1)))
    res = evaluate(p, [Extrapolate(), LastValue()], horizons=[5, 40], context=32, progress=False)
    by = {(r.method, r.horizon): r for r in res}
    assert by[("extrapolate", 5)].mse < 1e-8 and by[("extrapolate", 40)].mse < 1e-8
    assert by[("last_value", 5)].mse > 0
    assert by[("last_value", 5)].windows == 200 - 5 + 1 and by[("last_value", 40)].windows == 200 - 40 + 1


def test_seasonal_naive_is_exact_on_a_periodic_series_and_stride_thins_windows():
    t = np.arange(2000)
    p = prepare(hourly(np.sin(2 * np.pi * t / 24)[:, None] + 0.1 * (t % 3)[:, None]))
    assert season_length(p) == 24
    res = evaluate(p, [SeasonalNaive(24), LastValue()], horizons=[48], context=96, stride=10, progress=False)
    assert res[0].mse < 1e-10 and res[1].mse > 0.1
    assert res[0].windows == len(range(0, 400 - 48 + 1, 10))


def test_naive_forecasters():
    x = np.arange(20, dtype=np.float32).reshape(2, 10)
    np.testing.assert_array_equal(LastValue().predict_many(x, {3: 2})[3], [[9, 9, 9], [19, 19, 19]])
    np.testing.assert_array_equal(SeasonalNaive(4).predict_many(x, {6: 1})[6], [[6, 7, 8, 9, 6, 7]])


def test_dlinear_learns_what_last_value_cannot():
    rng = np.random.default_rng(0)
    t = np.arange(3000)
    values = np.sin(2 * np.pi * t / 24) + 0.01 * t + 0.05 * rng.normal(size=3000)
    p = prepare(hourly(values[:, None]))
    dl = DLinear(epochs=3, max_train_windows=800).fit(p, [24], context=96)
    res = evaluate(p, [dl, LastValue()], horizons=[24], context=96, stride=4, progress=False)
    assert res[0].mse < 0.25 * res[1].mse


def test_model_adapter_batches_and_matches_direct_predict():
    from moekit.models.timemoe import ForecasterConfig, TimeMoE

    torch.manual_seed(0)
    model = TimeMoE(ForecasterConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)).eval()
    x = np.random.default_rng(0).normal(size=(7, 40)).astype(np.float32)
    out = ModelForecaster(model, batch_size=3).predict_many(x, {5: 7, 70: 4})
    assert out[5].shape == (7, 5) and out[70].shape == (4, 70)
    np.testing.assert_allclose(out[70], model.predict(torch.from_numpy(x[:4]), 70).numpy(), atol=1e-5)


def test_bad_horizons_and_short_series():
    with pytest.raises(DataError, match="horizon"):
        parse_horizons("96,0")
    with pytest.raises(DataError, match="comma-separated"):
        parse_horizons("96;192")
    p = prepare(hourly(np.random.default_rng(0).normal(size=(300, 1))))
    with pytest.raises(DataError, match="too short for horizon"):
        evaluate(p, [LastValue()], horizons=[24, 96], context=32, progress=False)


def test_results_table_lists_methods_and_averages():
    p = prepare(hourly(np.sin(np.arange(600) / 5)[:, None]))
    res = evaluate(p, [LastValue(), SeasonalNaive(24)], horizons=[8, 16], context=24, progress=False)
    table = results_table(res)
    assert "last_value MSE" in table and "seasonal_naive MAE" in table and "| syn | avg |" in table


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "ETTh1.csv").is_file(), reason="needs ../shared/data/timeseries/ETTh1.csv")
def test_dlinear_reproduces_the_published_etth1_figure():
    p = prepare(read_csv(SHARED / "ETTh1.csv"))
    dl = DLinear().fit(p, [96], context=336)
    (res,) = evaluate(p, [dl], horizons=[96], context=336, progress=False)
    assert 0.35 < res.mse < 0.40  # DLinear paper, ETTh1-96 with L=336: MSE 0.375


# ---------------------------------------------------------------- weekly, daily and short files (issue 24)


def stamped(values_TC: np.ndarray, step: str, start: str = "2000-01-02") -> Series:
    unit = {"W": (7, "D"), "D": (1, "D"), "15min": (15, "m"), "H": (1, "h")}[step]
    t = (np.datetime64(start) + np.arange(len(values_TC)) * np.timedelta64(*unit)).astype("datetime64[s]")
    return Series(f"syn_{step}", values_TC.astype(np.float32), [f"c{i}" for i in range(values_TC.shape[1])], t)


def test_season_length_follows_the_step():
    x = np.zeros((200, 1))
    assert [season_length(prepare(stamped(x, s))) for s in ("W", "D", "15min", "H")] == [52, 7, 96, 24]
    months = np.array([f"{y}-{m:02d}-01" for y in range(2001, 2011) for m in range(1, 13)], dtype="datetime64[s]")
    assert season_length(prepare(Series("m", np.zeros((120, 1), np.float32), ["v"], months))) == 12


def test_weekly_seasonal_naive_is_seasonal_not_last_value():
    t = np.arange(966)
    rng = np.random.default_rng(0)
    pattern = rng.normal(size=52)
    p = prepare(stamped(pattern[t % 52][:, None], "W"))
    (seasonal,) = baselines(p, [26], context=104, dlinear=False)[1:]
    assert seasonal.period == 52
    res = evaluate(p, [seasonal, LastValue()], horizons=[26], context=104, progress=False)
    assert res[0].mse < 1e-10 and res[1].mse > 0.5  # a yearly pattern repeats exactly; the last value does not


def test_seasonal_naive_says_when_it_cannot_be_seasonal():
    x = np.sin(np.arange(400) / 3)[:, None]
    with pytest.warns(DataWarning, match="no seasonal period is known for a file without timestamps, so "
                                         "seasonal_naive equals last_value"):
        baselines(prepare(Series("plain", x.astype(np.float32), ["v"])), [8], 32, dlinear=False)
    with pytest.warns(DataWarning, match=r"seasonal period of 96 steps \(steps of 15 minutes\) does not fit the "
                                         r"context of 48.*--context 96 or more"):
        baselines(prepare(stamped(x, "15min")), [8], 48, dlinear=False)


def test_dlinear_trains_on_windows_stride_apart():
    p = prepare(stamped(np.sin(np.arange(1000) / 4)[:, None], "H"))
    train, val = DLinear(stride=10)._windows(p, 24, 96)
    np.testing.assert_array_equal(train, np.arange(96, 700 - 24 + 1, 10))
    np.testing.assert_array_equal(val, np.arange(700, 800 - 24 + 1, 10))


def test_a_weekly_file_too_short_for_the_horizon_names_the_split_and_the_fix():
    # 966 weekly rows, 70/10/20: train [0, 676), validation [676, 773), test [773, 966)
    t = np.arange(966)
    p = prepare(stamped(np.sin(2 * np.pi * t / 52)[:, None] + 0.001 * t[:, None], "W"))
    with pytest.raises(DataError, match=r"DLinear baseline cannot train for horizon 192: its train split is too short "
                                        r"\(the split \[0, 676\) holds 676 rows, of which 164 can be targets after "
                                        r"the first context of 512.*use --context 484 or less"):
        baselines(p, [192], 512, dlinear_kwargs={"epochs": 1})
    with pytest.warns(DataWarning, match=r"validation split \[676, 773\) is too short for horizon 192, so DLinear "
                                         r"trains all 2 epochs without early stopping"):
        methods = baselines(p, [192], 336, dlinear_kwargs={"epochs": 2, "stride": 8})
    res = evaluate(p, methods, horizons=[192], context=336, stride=1, progress=False)
    assert res[0].windows == 966 - 773 - 192 + 1 == 2 and all(np.isfinite(r.mse) for r in res)
    with pytest.raises(DataError, match=r"test split \[773, 966\) holds 193 rows.*use --horizons of at most 193"):
        evaluate(p, [LastValue()], horizons=[96, 336], context=336, progress=False)
