"""`moekit train-forecaster`, `forecast`, `eval-forecast`: end to end, and one clear message per mistake."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.cli.main import main

TINY = ["model.hidden_size=16", "model.intermediate_size=32", "model.num_layers=1", "model.num_heads=2",
        "train.steps=4", "train.seq_len=48", "train.batch_size=4", "train.eval_every=2", "train.save_every=2",
        "train.eval_batches=1", "train.warmup_steps=1", "train.device=cpu"]


def write_series(path: Path, rows: int = 1200, gaps: bool = False, text_column: bool = False) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(rows)
    start = np.datetime64("2021-03-01T00:00:00")
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "load", "temp"] + (["site"] if text_column else []))
        for i in t:
            stamp = str(start + np.timedelta64(int(i), "h")).replace("T", " ")
            load = 10 + 3 * np.sin(2 * np.pi * i / 24) + rng.normal(0, 0.2)
            temp = 20 + 0.01 * i + rng.normal(0, 0.1)
            cells = [stamp, f"{load:.4f}", "" if gaps and i in (5, 6, 700) else f"{temp:.4f}"]
            w.writerow(cells + (["north"] if text_column else []))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    data = write_series(d / "series.csv", gaps=True, text_column=True)
    torch.manual_seed(0)
    code = main(["train-forecaster", "--csv", str(data), "--csv", str(data), "--out", str(d / "run"), "--quiet", *TINY])
    assert code == 0
    return d, data


def test_train_forecaster_writes_a_resumable_run(trained, capsys):
    d, data = trained
    run = d / "run"
    assert (run / "latest").read_text().strip() == "step-00000004"
    cfg = json.loads((run / "step-00000004" / "config.json").read_text())
    assert cfg["model_type"] == "moekit-forecaster" and cfg["forecaster"]["hidden_size"] == 16
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_huber" in x for x in lines) and any("balance" in x for x in lines)
    assert main(["train-forecaster", "--out", str(run), "--resume", "--quiet"]) == 0  # nothing left to do
    assert "trained 4 steps" in capsys.readouterr().out


def test_forecast_writes_csv_with_continued_timestamps_and_a_plot(trained, capsys):
    d, data = trained
    out, png = d / "f.csv", d / "f.png"
    code = main(["forecast", "--model", str(d / "run"), "--csv", str(data), "--horizon", "30", "--context", "96",
                 "--out", str(out), "--plot", str(png)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "skipped non-numeric column(s) site" in captured.err and "filled 3 missing value(s)" in captured.err
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["date", "load", "temp"] and len(rows) == 31
    assert rows[1][0] == "2021-04-20 00:00:00" and rows[2][0] == "2021-04-20 01:00:00"  # 1200 h after 2021-03-01
    assert all(np.isfinite(float(v)) for r in rows[1:] for v in r[1:])
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_eval_forecast_prints_model_and_baselines(trained, capsys):
    d, data = trained
    code = main(["eval-forecast", "--model", str(d / "run"), "--csv", str(data), "--horizons", "24,48",
                 "--stride", "24", "--context", "96", "--quiet", "--out", str(d / "eval.json")])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("time_moe MSE", "last_value MSE", "seasonal_naive MSE", "dlinear MSE"):
        assert name in out
    saved = json.loads((d / "eval.json").read_text())
    assert {r["horizon"] for r in saved["results"]} == {24, 48}


def run_cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_bad_input_gets_one_clear_message(trained, tmp_path, capsys):
    d, data = trained
    model = str(d / "run")
    text_only = tmp_path / "names.csv"
    text_only.write_text("date,name\n2020-01-01,a\n2020-01-02,b\n")
    code, err = run_cli(["forecast", "--model", model, "--csv", str(text_only), "--horizon", "5", "--out",
                         str(tmp_path / "x.csv")], capsys)
    assert code == 2 and "no numeric column" in err and err.count("\n") == 1

    # a forecast needs --context points of history, not context + horizon (issue 24)
    code, err = run_cli(["forecast", "--model", model, "--csv", str(data), "--horizon", "300", "--context", "1300",
                         "--out", str(tmp_path / "x.csv")], capsys)
    assert code == 2 and "1200 time steps" in err and "--context 1300: use --context 1200 or less" in err

    code, err = run_cli(["forecast", "--model", model, "--csv", str(data), "--horizon", "0", "--out",
                         str(tmp_path / "x.csv")], capsys)
    assert code == 2 and "--horizon 0 is invalid" in err

    code, err = run_cli(["eval-forecast", "--model", model, "--csv", str(data), "--horizons", "24,-1"], capsys)
    assert code == 2 and "positive integer" in err

    from moekit.checkpoints import save_checkpoint

    save_checkpoint(tmp_path / "lm", 1, config={"model": {}}, model_state={"w": torch.zeros(1)},
                    optimizer_state=None, trainer_state={})
    code, err = run_cli(["forecast", "--model", str(tmp_path / "lm"), "--csv", str(data), "--horizon", "5",
                         "--out", str(tmp_path / "x.csv")], capsys)
    assert code == 2 and "not a forecaster checkpoint" in err
    assert not (tmp_path / "x.csv").exists()  # nothing half-written

    code, err = run_cli(["train-forecaster", "--out", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 2 and "no training CSV" in err


def test_no_traceback_from_the_installed_command(tmp_path):
    text_only = tmp_path / "names.csv"
    text_only.write_text("date,name\n2020-01-01,a\n")
    proc = subprocess.run([sys.executable, "-m", "moekit", "forecast", "--model", str(tmp_path), "--csv",
                           str(text_only), "--horizon", "3", "--out", str(tmp_path / "o.csv")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no numeric column" in proc.stderr


def test_fine_tuning_starts_from_the_init_model(trained, tmp_path, capsys):
    d, data = trained
    from moekit.hf.timemoe import save_hf
    from moekit.infer.forecast import load_forecaster

    save_hf(load_forecaster(d / "run"), tmp_path / "hf")  # a Time-MoE Hugging Face directory
    overrides = ["train.steps=2", "train.seq_len=48", "train.batch_size=2", "train.eval_every=0", "train.device=cpu"]
    args = ["train-forecaster", "--init", str(tmp_path / "hf"), "--csv", str(data), "--out", str(tmp_path / "ft"),
            "--quiet", *overrides]
    assert main(args) == 0
    cfg = json.loads((tmp_path / "ft" / "step-00000002" / "config.json").read_text())
    assert cfg["train"]["lr"] == 1e-4 and cfg["forecaster"]["hidden_size"] == 16
    code, err = run_cli(args[:-len(overrides)] + ["--out", str(tmp_path / "ft2"), "model.hidden_size=32"], capsys)
    assert code == 2 and "drop the override(s) of model.hidden_size" in err


def write_day_first(path: Path, rows: int = 240) -> Path:
    """Hourly rows from 1 March 2021 written dd/mm/YYYY HH:MM: ten days, so every day <= 12 (ambiguous)."""
    start = np.datetime64("2021-03-01T00:00")
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "load"])
        for i in range(rows):
            stamp = (start + np.timedelta64(i, "h")).astype(object).strftime("%d/%m/%Y %H:%M")
            w.writerow([stamp, f"{10 + np.sin(i / 4):.4f}"])
    return path


def test_ambiguous_dates_are_refused_by_every_forecast_command(trained, tmp_path, capsys):
    d, _ = trained
    data = write_day_first(tmp_path / "eu.csv")
    commands = [
        ["train-forecaster", "--csv", str(data), "--out", str(tmp_path / "r"), "--quiet", *TINY],
        ["forecast", "--model", str(d / "run"), "--csv", str(data), "--horizon", "5", "--out", str(tmp_path / "f.csv")],
        ["eval-forecast", "--model", str(d / "run"), "--csv", str(data), "--horizons", "5", "--context", "24", "--quiet"],
    ]
    for args in commands:
        code, err = run_cli(args, capsys)
        assert code == 2 and err.count("\n") == 1, (args[0], err)
        assert "column 'date'" in err and "ambiguous" in err and "--dayfirst" in err and "--date-format" in err
    assert not (tmp_path / "f.csv").exists() and not (tmp_path / "r").exists()


def test_dayfirst_and_date_format_on_the_forecast_commands(trained, tmp_path, capsys):
    d, _ = trained
    data = write_day_first(tmp_path / "eu.csv")
    for option in (["--dayfirst"], ["--date-format", "%d/%m/%Y %H:%M"]):
        out = tmp_path / "f.csv"
        code, err = run_cli(["forecast", "--model", str(d / "run"), "--csv", str(data), "--horizon", "3",
                             "--context", "48", "--out", str(out), *option], capsys)
        assert code == 0, err
        rows = list(csv.reader(out.open()))
        # 240 hours after 2021-03-01 00:00 is 11 March 00:00, written like the file (day first)
        assert [r[0] for r in rows[1:]] == ["11/03/2021 00:00", "11/03/2021 01:00", "11/03/2021 02:00"]
    code, err = run_cli(["eval-forecast", "--model", str(d / "run"), "--csv", str(data), "--horizons", "5",
                         "--context", "24", "--stride", "12", "--no-baselines", "--quiet", "--dayfirst"], capsys)
    assert code == 0, err
    run = tmp_path / "r"
    code, err = run_cli(["train-forecaster", "--csv", str(data), "--out", str(run), "--quiet",
                         "--date-format", "%d/%m/%Y %H:%M", *TINY[:4], "train.steps=1", "train.seq_len=48",
                         "train.batch_size=2", "train.eval_every=0", "train.warmup_steps=1", "train.device=cpu"], capsys)
    assert code == 0, err
    saved = json.loads((run / "step-00000001" / "config.json").read_text())
    assert saved["data"]["date_format"] == "%d/%m/%Y %H:%M" and saved["data"]["dayfirst"] is False


def test_an_output_that_cannot_be_written_is_one_message(trained, tmp_path, capsys, monkeypatch):
    d, data = trained
    model = str(d / "run")
    for out in ("/proc/x.csv", "/proc/no/x.csv"):
        code, err = run_cli(["forecast", "--model", model, "--csv", str(data), "--horizon", "5", "--out", out], capsys)
        assert code == 2 and out in err and err.count("error:") == 1, err
    code, err = run_cli(["eval-forecast", "--model", model, "--csv", str(data), "--horizons", "24", "--context", "96",
                         "--stride", "200", "--no-baselines", "--quiet", "--out", "/proc/x.json"], capsys)
    assert code == 2 and "/proc/x.json" in err and err.count("error:") == 1, err

    from pathlib import Path as P

    def fail(self, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(P, "replace", fail)  # the write itself fails after the temporary file was written
    out = tmp_path / "f.csv"
    code, err = run_cli(["forecast", "--model", model, "--csv", str(data), "--horizon", "5", "--out", str(out)], capsys)
    assert code == 2 and "No space left on device" in err and str(out) in err
    assert list(tmp_path.iterdir()) == []  # neither the forecast nor its temporary file


def test_resuming_a_finished_forecaster_names_its_checkpoint(trained, capsys):
    d, _ = trained
    assert main(["train-forecaster", "--out", str(d / "run"), "--resume", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint: None" not in out and f"checkpoint: {d / 'run' / 'step-00000004'}" in out
    assert "trained 0 steps in" in out and "(resumed at step 4; the run has trained 4 steps in all)" in out


# ---------------------------------------------------------------- any CSV a user has (issue 24)


def test_forecast_context_5_on_a_5_row_file(trained, tmp_path, capsys):
    d, _ = trained
    five = tmp_path / "five.csv"
    five.write_text("date,v\n" + "".join(f"2021-01-0{i + 1},{10 + i}\n" for i in range(5)))
    out = tmp_path / "f.csv"
    code, err = run_cli(["forecast", "--model", str(d / "run"), "--csv", str(five), "--horizon", "3", "--context", "5",
                         "--out", str(out)], capsys)
    assert code == 0, err
    rows = list(csv.reader(out.open()))
    assert [r[0] for r in rows[1:]] == ["2021-01-06", "2021-01-07", "2021-01-08"]
    assert all(np.isfinite(float(r[1])) for r in rows[1:])
    code, err = run_cli(["forecast", "--model", str(d / "run"), "--csv", str(five), "--horizon", "3", "--context", "3",
                         "--out", str(out)], capsys)
    assert code == 2 and "--context 3 is too short" in err and "at least 4" in err and "seq_len" not in err


def test_a_messy_csv_forecasts_with_one_plain_line_per_repair(trained, tmp_path, capsys):
    d, _ = trained
    start = np.datetime64("2021-03-01T00:00")
    rows = [(str(start + np.timedelta64(i, "h")).replace("T", " "), f"{10 + np.sin(i / 4):.4f}".replace(".", ","),
             "7,5", "north") for i in range(200)]
    rows[50] = (rows[50][0], "n/a?", "7,5", "north")
    messy = tmp_path / "messy.csv"  # semicolons, decimal commas, newest first, a text cell, a constant and a text column
    messy.write_text("date;load;flat;site\n" + "".join(";".join(r) + "\n" for r in reversed(rows)))
    out = tmp_path / "f.csv"
    code, err = run_cli(["forecast", "--model", str(d / "run"), "--csv", str(messy), "--horizon", "4", "--context", "96",
                         "--out", str(out)], capsys)
    assert code == 0, err
    lines = err.strip().splitlines()
    assert all(ln.startswith("moekit forecast: warning: ") for ln in lines) and len(lines) == 5, err
    for part in ("column 'load': 1 cell(s) that are not numbers read as missing (e.g. 'n/a?')",
                 "skipped non-numeric column(s) site", "rows are newest first: reversed by date",
                 "constant column(s) flat (always 7.5)", "filled 1 missing value(s) in load (1)"):
        assert part in err, part
    got = list(csv.reader(out.open()))
    assert got[0] == ["date", "load", "flat"]
    assert got[1][0] == "2021-03-09 08:00"  # 200 hours after the oldest row: the newest row is the last
    assert all(abs(float(r[2]) - 7.5) < 1e-3 for r in got[1:])  # a constant channel forecasts as its value
    code, err = run_cli(["forecast", "--model", str(d / "run"), "--csv", str(messy), "--horizon", "4", "--columns",
                         "flat", "--out", str(out)], capsys)
    assert code == 0 and list(csv.reader(out.open()))[0] == ["date", "flat"]
    code, err = run_cli(["forecast", "--model", str(d / "run"), "--csv", str(messy), "--horizon", "4", "--columns",
                         "load,speed", "--out", str(out)], capsys)
    assert code == 2 and "no column(s) 'speed'; its columns are load, flat, site" in err


def test_train_forecaster_on_an_inf_cell_trains_finite_weights(tmp_path, capsys):
    data = write_series(tmp_path / "s.csv", rows=600)
    text = data.read_text().splitlines()
    cells = text[100].split(",")
    text[100] = ",".join(cells[:1] + ["inf"] + cells[2:])
    data.write_text("\n".join(text) + "\n")
    code = main(["train-forecaster", "--csv", str(data), "--out", str(tmp_path / "r"), "--quiet", "--columns", "load",
                 *TINY])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "column 'load': 1 infinite value(s) read as missing" in err
    assert "validation Huber loss" in out and "nan" not in out
    from moekit.infer.forecast import load_forecaster

    model = load_forecaster(tmp_path / "r")
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())
    saved = json.loads((tmp_path / "r" / "step-00000004" / "config.json").read_text())
    assert saved["data"]["columns"] == "load"


def test_eval_forecast_on_weekly_data_is_seasonal_and_dlinear_follows_stride(trained, tmp_path, capsys, monkeypatch):
    d, _ = trained
    rng = np.random.default_rng(0)
    pattern = rng.normal(size=52)
    weekly = tmp_path / "weekly.csv"
    start = np.datetime64("2000-01-02")
    weekly.write_text("date,v\n" + "".join(f"{start + np.timedelta64(7 * i, 'D')},{pattern[i % 52]:.6f}\n"
                                           for i in range(966)))
    import moekit.infer.forecast_eval as fe

    strides = []
    real = fe.DLinear._windows
    monkeypatch.setattr(fe.DLinear, "_windows", lambda self, *a: strides.append(self.stride) or real(self, *a))
    code = main(["eval-forecast", "--model", str(d / "run"), "--csv", str(weekly), "--horizons", "26",
                 "--context", "104", "--stride", "13", "--quiet", "--out", str(tmp_path / "e.json")])
    assert code == 0
    res = {r["method"]: r["mse"] for r in json.loads((tmp_path / "e.json").read_text())["results"]}
    assert res["seasonal_naive"] < 1e-8 < res["last_value"]  # weekly: a 52-week season, not the last value
    assert strides == [13]
