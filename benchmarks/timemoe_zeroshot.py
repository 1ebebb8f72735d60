"""Zero-shot Time-MoE on a dataset it never saw: ETTm1, with ETTh1 (the same transformer, hourly) left out too.

Pretrains (or reuses) four forecasters on the corpus without ETTm1 and ETTh1
(`moekit pretrain-forecaster --exclude ETTm1,ETTh1`): the MoE and the dense
model of equal active parameters, each at two learning rates, the same corpus,
steps and batches. Each variant's learning rate is chosen on the ETTh2
validation loss (never on ETTm1). Then, on ETTm1's standard test split
(context 512, horizons 96/192/336/720, values standardised by the train split,
windows every `--stride` steps), scores with one harness: the zero-shot MoE and
dense models, last value, seasonal naive (96 steps = one day), statsforecast's
AutoETS (season 96) fitted on each context, and DLinear trained in-domain on
ETTm1's train split. Also: the empirical coverage of the MoE's 10-90% interval
on every held-out target point, and the wall time of `moekit forecast` on a
20-channel CSV of 512 rows (start-up included; the shipped model when present).
Published zero-shot figures of other models are listed, labelled as published.

    python benchmarks/timemoe_zeroshot.py --runs runs/zeroshot     # about 60 minutes on 2 idle cores

Writes benchmarks/results/timemoe_zeroshot.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import command_line, machine_info, markdown_table, target, write_results  # noqa: E402
from _zeroshot_published import PUBLISHED, published_markdown  # noqa: E402

DATA = ROOT / ".." / "shared" / "data" / "timeseries"
HELD_OUT, ALSO_EXCLUDED = "ETTm1", ("ETTh1",)
LRS = (0.005, 0.002)
STEPS = 600
HORIZONS = (96, 192, 336, 720)
MOEKIT = [sys.executable, "-m", "moekit"]


def pretrain_args(run: Path, dense: bool, lr: float, corpus: Path | None) -> list[str]:
    args = [*MOEKIT, "pretrain-forecaster", "--out", str(run), "--data-dir", str(DATA), "--quiet",
            "--exclude", ",".join((HELD_OUT, *ALSO_EXCLUDED)), f"train.steps={STEPS}", "train.warmup_steps=30",
            "train.eval_every=300", "corpus.synthetic=400", f"train.lr={lr}"]
    return args + (["--dense"] if dense else []) + (["--corpus", str(corpus)] if corpus else [])


def ensure_runs(runs: Path) -> dict[str, Path]:
    """Train whichever of the four runs is missing or unfinished; all share the first run's corpus."""
    out, corpus = {}, None
    for dense in (False, True):
        for lr in LRS:
            run = runs / f"{'dense' if dense else 'moe'}_lr{lr}"
            if not (run / "hf" / "model.safetensors").is_file():
                resume = (run / "corpus.npz").is_file()
                cmd = [*MOEKIT, "pretrain-forecaster", "--out", str(run), "--resume", "--quiet"] if resume \
                    else pretrain_args(run, dense, lr, corpus)
                print("+", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True)
            corpus = corpus or run / "corpus.npz"
            out[run.name] = run
    return out


def check_held_out(run: Path) -> dict:
    """The run's config and corpus prove ETTm1 and ETTh1 were never seen (refuses otherwise)."""
    config = json.loads((run / (run / "latest").read_text().strip() / "config.json").read_text())
    seen = set(config["corpus_points"])
    leaked = seen & {HELD_OUT, *ALSO_EXCLUDED}
    if leaked:
        raise SystemExit(f"{run} was trained on {sorted(leaked)}: it cannot be scored zero-shot")
    return config


def final_val(run: Path) -> float:
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_huber" in line]
    return float(evals[-1]["val_huber"])


class AutoETSMethod:
    """statsforecast's AutoETS fitted on each context (the issue's well-kept library baseline)."""

    name = "auto_ets"

    def __init__(self, season: int) -> None:
        self.season = season

    def predict_many(self, context_NL: np.ndarray, horizons: dict[int, int]) -> dict[int, np.ndarray]:
        from statsforecast.models import AutoETS

        n, longest = max(horizons.values()), max(horizons)
        preds = np.stack([AutoETS(season_length=self.season).forecast(y=row.astype(np.float64), h=longest)["mean"]
                          for row in context_NL[:n]])
        return {h: preds[:k, :h] for h, k in horizons.items()}


def coverage(model, table, prepared, stride: int, context: int = 512, horizon: int = 720) -> dict:
    """Fraction of held-out target points inside the 10-90% interval, and below q10 / above q90."""
    from moekit.data.timeseries import gather_windows, window_starts
    from moekit.models.forecast_quantiles import context_std, predict_batched

    lo, hi = prepared.splits.get("test")
    starts = window_starts((lo, hi), context, horizon, stride)
    x_NCL, y_NCH = gather_windows(prepared.scaled_TC, starts, context, horizon)
    x, y = x_NCL.reshape(-1, context), y_NCH.reshape(-1, horizon)
    q = table.apply(predict_batched(model, x, horizon).astype(np.float64), context_std(x))
    inside = (y >= q[..., 0]) & (y <= q[..., -1])
    return {"covered": float(inside.mean()), "below_q10": float((y < q[..., 0]).mean()),
            "above_q90": float((y > q[..., -1]).mean()), "points": int(y.size), "windows": int(len(starts))}


def forecast_latency(model_dir: Path | None, repeats: int = 5) -> dict:
    """Wall seconds of `moekit forecast` on 20 channels x 512 rows, horizon 96, start-up included."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        t = np.arange(512)
        frame = pd.DataFrame({f"ch{c}": np.sin(2 * np.pi * t / 24 + c) + 0.1 * rng.standard_normal(512)
                              for c in range(20)})
        frame.insert(0, "date", pd.date_range("2024-01-01", periods=512, freq="h").astype(str))
        csv = Path(tmp) / "twenty.csv"
        frame.to_csv(csv, index=False)
        cmd = [*MOEKIT, "forecast", "--csv", str(csv), "--horizon", "96", "--out", str(Path(tmp) / "f.csv")]
        cmd += ["--model", str(model_dir)] if model_dir is not None else []
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
    return {"seconds": times, "median_s": float(np.median(times)), "command": " ".join(cmd[2:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "zeroshot")
    ap.add_argument("--stride", type=int, default=192, help="steps between test windows (default 192: two days)")
    ap.add_argument("--latency-only", action="store_true",
                    help="re-measure only `moekit forecast`'s wall time (an idle machine) into the committed results")
    args = ap.parse_args()
    if args.latency_only:
        return remeasure_latency()
    started = time.perf_counter()
    runs = ensure_runs(args.runs)
    result = score(runs, args.stride)
    result["seconds"] = time.perf_counter() - started
    write_results("timemoe_zeroshot", result, render(result))


def remeasure_latency() -> None:
    """Latency again, with the shipped model, into the committed JSON (its other figures unchanged)."""
    from _common import RESULTS_DIR

    from moekit.hf.timemoe import SHIPPED_DIR

    path = Path(RESULTS_DIR) / "timemoe_zeroshot.json"
    result = json.loads(path.read_text())
    shipped = (SHIPPED_DIR / "model.safetensors").is_file()
    result["latency"] = forecast_latency(None if shipped else Path(result["latency_model"]))
    result["latency_model"] = "shipped" if shipped else result["latency_model"]
    result["latency_command"] = command_line()
    result["targets"][-1] = target("moekit forecast, 20 channels x 512 points, median wall seconds",
                                   result["latency"]["median_s"], 5.0, "<=")
    write_results("timemoe_zeroshot", result, render(result))


def score(runs: dict[str, Path], stride: int) -> dict:
    from moekit.data.timeseries import prepare, read_csv
    from moekit.hf.timemoe import SHIPPED_DIR, load_hf
    from moekit.infer.forecast_eval import DLinear, LastValue, ModelForecaster, SeasonalNaive, evaluate, results_dicts
    from moekit.models.forecast_quantiles import load_table

    configs = {name: check_held_out(run) for name, run in runs.items()}
    vals = {name: final_val(run) for name, run in runs.items()}
    best = {kind: min((n for n in runs if n.startswith(kind)), key=vals.get) for kind in ("moe", "dense")}
    models = {kind: load_hf(runs[best[kind]] / "hf") for kind in best}
    prepared = prepare(read_csv(DATA / f"{HELD_OUT}.csv"))
    dlinear = DLinear().fit(prepared, list(HORIZONS), 512, progress=True)
    methods = [ModelForecaster(models["moe"], name="time_moe_zero_shot"),
               ModelForecaster(models["dense"], name="dense_zero_shot"), LastValue(), SeasonalNaive(96),
               AutoETSMethod(96), dlinear]
    rows = results_dicts(evaluate(prepared, methods, HORIZONS, context=512, stride=stride))
    avg = {m.name: float(np.mean([r["mse"] for r in rows if r["method"] == m.name])) for m in methods}
    cov = coverage(models["moe"], load_table(runs[best["moe"]] / "hf"), prepared, stride)
    shipped = (SHIPPED_DIR / "model.safetensors").is_file()
    latency = forecast_latency(None if shipped else runs[best["moe"]] / "hf")
    zs = avg["time_moe_zero_shot"]
    targets = [
        target("zero-shot MoE average MSE < seasonal naive's", zs, avg["seasonal_naive"], "<="),
        target("zero-shot MoE average MSE < AutoETS's", zs, avg["auto_ets"], "<="),
        target("zero-shot MoE average MSE / in-domain DLinear's", zs / avg["dlinear"], 1.15, "<="),
        target("MoE average MSE / dense average MSE (equal active parameters, each at its best lr)",
               zs / avg["dense_zero_shot"], 0.97, "<="),
        target("10-90% interval coverage of held-out points >= 0.75", cov["covered"], 0.75, ">="),
        target("10-90% interval coverage of held-out points <= 0.85", cov["covered"], 0.85, "<="),
        target("moekit forecast, 20 channels x 512 points, median wall seconds", latency["median_s"], 5.0, "<="),
    ]
    return {"command": command_line(), "machine": machine_info(), "held_out": HELD_OUT,
            "also_excluded": list(ALSO_EXCLUDED), "stride": stride, "horizons": list(HORIZONS), "context": 512,
            "runs": {n: {"val_huber": vals[n], "steps": configs[n]["train"]["steps"], "lr": configs[n]["train"]["lr"],
                         "corpus_points": configs[n]["corpus_points"]} for n in runs},
            "chosen": best, "results": rows, "average_mse": avg, "coverage": cov, "latency": latency,
            "latency_model": "shipped" if shipped else str(runs[best["moe"]] / "hf"),
            "published": PUBLISHED, "targets": targets}


def render(r: dict) -> str:
    lines = [f"# Zero-shot Time-MoE on {r['held_out']} (never seen; {', '.join(r['also_excluded'])} left out too)", "",
             f"`{r['command']}`, {r['seconds'] / 60:.1f} min. Context {r['context']}, horizons "
             f"{', '.join(map(str, r['horizons']))}, test windows every {r['stride']} steps, values standardised by "
             f"the train split; MSE/MAE averaged over channels, windows and steps.", "", "## Targets", "",
             markdown_table(["target", "value", "goal", "met"],
                            [[t["name"], f"{t['value']:.4f}", f"{t['direction']} {t['goal']}",
                              "yes" if t["met"] else "**no**"] for t in r["targets"]]), "",
             "## Pretraining runs (learning rate chosen on the ETTh2 validation loss)", "",
             markdown_table(["run", "lr", "steps", "val Huber"],
                            [[n, v["lr"], v["steps"], f"{v['val_huber']:.4f}"] for n, v in r["runs"].items()]), "",
             "## Average over horizons", "",
             markdown_table(["method", "average MSE"], [[m, f"{v:.4f}"] for m, v in r["average_mse"].items()]), "",
             "## Per horizon", "",
             markdown_table(["method", "horizon", "windows", "MSE", "MAE"],
                            [[x["method"], x["horizon"], x["windows"], f"{x['mse']:.4f}", f"{x['mae']:.4f}"]
                             for x in r["results"]]), "",
             f"Coverage of the 10-90% interval: {r['coverage']['covered']:.3f} of {r['coverage']['points']:,} points "
             f"({r['coverage']['below_q10']:.3f} below q10, {r['coverage']['above_q90']:.3f} above q90).", "",
             f"`moekit forecast` latency ({r['latency_model']} model; `{r.get('latency_command', r['command'])}`): "
             f"median {r['latency']['median_s']:.2f} s over {len(r['latency']['seconds'])} runs, start-up included.",
             "", published_markdown()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
