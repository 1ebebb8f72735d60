"""The evaluation harness: window alignment, metrics, baselines and the model adapter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.data.timeseries import Series, prepare, read_csv
from moekit.errors import DataError
from moekit.infer.forecast_eval import (
    DLinear,
    LastValue,
    ModelForecaster,
    SeasonalNaive,
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
