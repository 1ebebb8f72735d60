"""`moekit pretrain-forecaster`, the shipped forecaster, quantile columns and the Time-MoE layout export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.cli import main
from moekit.hf.timemoe import SHIPPED_DIR, load_forecaster, load_hf
from moekit.models.timemoe import load_moekit_forecaster

pytest.importorskip("sktime")
pytest.importorskip("statsmodels")
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "timeseries"
MICRO = ["model.hidden_size=16", "model.intermediate_size=32", "model.num_layers=1", "model.num_heads=2",
         "train.seq_len=48", "train.batch_size=4", "train.warmup_steps=0", "train.save_every=0", "train.eval_every=0",
         "corpus.synthetic=2", "corpus.synthetic_length=64", "train.min_lr_ratio=1.0"]
NO_ETT = ["--exclude", "ETTh1,ETTh2,ETTm1"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    assert main(["pretrain-forecaster", "--out", str(out), "--quiet", *NO_ETT, *MICRO, "train.steps=6"]) == 0
    return out


def test_pretraining_writes_a_time_moe_directory_equal_to_its_checkpoint(run):
    hf = json.loads((run / "hf" / "config.json").read_text())
    assert hf["model_type"] == "time_moe"
    x = torch.randn(3, 40)
    a, b = load_hf(run / "hf"), load_moekit_forecaster(run)
    assert torch.equal(a.predict(x, 12), b.predict(x, 12))
    assert json.loads((run / "pretrain_time.json").read_text())["seconds"] > 0
    assert len(losses(run)) == 6 and np.isfinite(losses(run)).all()


def test_a_resumed_pretraining_run_repeats_the_uninterrupted_one_bit_for_bit(run, tmp_path):
    # Oracle: the 6-step run above; constant lr, so 3 steps + a resume to 6 must give the same losses.
    part = tmp_path / "part"
    assert main(["pretrain-forecaster", "--out", str(part), "--quiet", *NO_ETT, *MICRO, "train.steps=3"]) == 0
    assert main(["pretrain-forecaster", "--out", str(part), "--resume", "--quiet", "train.steps=6"]) == 0
    assert losses(part) == losses(run)


def test_resume_refuses_model_and_corpus_overrides(run, capsys):
    assert main(["pretrain-forecaster", "--out", str(run), "--resume", "--quiet", "model.num_layers=3"]) == 2
    assert "only train.* overrides" in capsys.readouterr().err


def test_a_missing_ett_directory_is_named(tmp_path, capsys):
    code = main(["pretrain-forecaster", "--out", str(tmp_path / "r"), "--data-dir", str(tmp_path / "none"), *MICRO])
    assert code == 2 and "--data-dir" in capsys.readouterr().err
    assert not (tmp_path / "r" / "corpus.npz").exists()


def test_a_corpus_holding_an_excluded_dataset_is_refused(run, tmp_path, capsys):
    code = main(["pretrain-forecaster", "--out", str(tmp_path / "r"), "--corpus", str(run / "corpus.npz"), *NO_ETT,
                 "--exclude", "Airline,ETTh1,ETTh2,ETTm1", *MICRO])
    assert code == 2 and "holds Airline" in capsys.readouterr().err


@pytest.mark.skipif(not (SHIPPED_DIR / "model.safetensors").is_file(), reason="the shipped forecaster is not built")
def test_forecast_without_model_uses_the_shipped_forecaster_and_writes_quantile_columns(tmp_path, capsys):
    import pandas as pd

    t = np.arange(200)
    stamps = pd.date_range("2024-01-01", periods=200, freq="h")
    rows = ["date,load,temp"] + [f"{s},{np.sin(i / 4):.4f},{i % 24}" for s, i in zip(stamps, t)]
    csv = tmp_path / "h.csv"
    csv.write_text("\n".join(rows) + "\n")
    assert main(["forecast", "--csv", str(csv), "--horizon", "24", "--out", str(tmp_path / "f.csv"),
                 "--plot", str(tmp_path / "f.png")]) == 0
    f = pd.read_csv(tmp_path / "f.csv")
    assert list(f.columns) == ["date", "load", "load_q10", "load_q50", "load_q90", "temp", "temp_q10", "temp_q50",
                               "temp_q90"]
    model = load_forecaster(None)  # the oracle for the point column: the shipped model's own predict
    history = torch.tensor([[float(f"{v:.4f}") for v in np.sin(t / 4)], list((t % 24).astype(float))])
    expected = model.predict(history.float(), 24).numpy()
    assert np.allclose(f["load"], expected[0], rtol=1e-4, atol=1e-4)
    assert (f["load_q10"] <= f["load_q90"]).all() and (f["temp_q10"] < f["temp_q90"]).all()
    assert (tmp_path / "f.png").stat().st_size > 10_000


@pytest.mark.skipif(not (SHIPPED_DIR / "model.safetensors").is_file(), reason="the shipped forecaster is not built")
def test_the_shipped_forecaster_exports_to_the_time_moe_layout(tmp_path):
    assert main(["export-forecaster", "--out", str(tmp_path / "tm")]) == 0
    assert (tmp_path / "tm" / "quantiles.json").is_file()
    x = torch.randn(2, 64)
    assert torch.equal(load_hf(tmp_path / "tm").predict(x, 8), load_forecaster(None).predict(x, 8))
    assert (SHIPPED_DIR / "model.safetensors").stat().st_size < 20e6


def test_a_forecaster_with_nan_weights_is_refused_and_writes_nothing(run, tmp_path, capsys):
    from moekit.hf.timemoe import save_hf

    model = load_hf(run / "hf")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    save_hf(model, tmp_path / "nan")
    csv = tmp_path / "s.csv"
    csv.write_text("t,v\n" + "".join(f"{i},{np.sin(i)}\n" for i in range(60)))
    code = main(["forecast", "--model", str(tmp_path / "nan"), "--csv", str(csv), "--horizon", "4",
                 "--out", str(tmp_path / "f.csv")])
    assert code == 2 and "non-finite forecasts" in capsys.readouterr().err
    assert not (tmp_path / "f.csv").exists()
