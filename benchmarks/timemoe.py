"""Time-MoE on CPU: a tiny MoE forecaster vs a dense one of equal active parameters, and the baselines.

Trains a tiny Time-MoE and a dense Time-MoE (same blocks, the FFN a SwiGLU as
wide as the MoE's active experts: 2 x I/2 routed + I shared) on the train
splits of ../shared/data/timeseries (ETTh1, ETTh2, ETTm1), with the same
batches, steps and optimiser. Then scores both, and last value, seasonal naive
and DLinear (trained on each target's own train split), with one harness on
the same test windows: MSE and MAE on the train-scaled values, averaged over
channels, windows and steps, for horizons 96/192/336/720 from a 512-step
context. Windows start once a day (stride 24 on ETTh, 96 on ETTm1) instead of
every step, so the whole run fits 45 minutes on 2 cores.

Targets (Time-MoE's claims at CPU scale): the MoE's average MSE is below the
dense model's, and below DLinear's on ETTh1 and on ETTh2.

    python benchmarks/timemoe.py --threads 1     # the full run (about 40 minutes on 2 cores)
    python benchmarks/timemoe.py --quick         # a one-minute smoke run (results not written)
    python benchmarks/timemoe.py --render        # rewrite timemoe.{json,md} from the committed JSON (no training)

Writes benchmarks/results/timemoe.{json,md,png} (JSON and markdown through _common.write_results).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import RESULTS_DIR, command_line, machine_info, target, write_results  # noqa: E402
from moekit.data.timeseries import prepare, read_csv  # noqa: E402
from moekit.infer.forecast_eval import (  # noqa: E402
    DLinear,
    EvalResult,
    LastValue,
    ModelForecaster,
    SeasonalNaive,
    evaluate,
    results_dicts,
    results_table,
    season_length,
)
from moekit.models.timemoe import PRESETS, dense_equivalent  # noqa: E402
from moekit.train.forecaster import train_forecaster  # noqa: E402

DATA = ROOT / ".." / "shared" / "data" / "timeseries"
DATASETS = ("ETTh1", "ETTh2", "ETTm1")
RESULTS = RESULTS_DIR
NAME = "timemoe"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=0, help="training steps for each model (0: fit --train-minutes)")
    p.add_argument("--train-minutes", type=float, default=11.0, help="time the MoE may train; the dense model gets the same steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512, help="training sequence length")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--mixture", default="equal", help="equal: each dataset alike; size: by number of points")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--horizons", default="96,192,336,720")
    p.add_argument("--windows-per-day", type=int, default=1, help="test windows per day of data (24 = every hour on ETTh)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run; nothing is written to benchmarks/results")
    p.add_argument("--keep-runs", metavar="DIR", help="keep the two training runs in DIR")
    p.add_argument("--render", action="store_true",
                   help="only rewrite timemoe.json (targets recomputed) and timemoe.md from the existing timemoe.json")
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.render:
        return render()
    missing = [d for d in DATASETS if not (DATA / f"{d}.csv").is_file()]
    if missing:
        print(f"benchmarks/timemoe.py needs {', '.join(missing)}.csv in {DATA.resolve()} (the shared data folder)",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    horizons = [int(h) for h in args.horizons.split(",")]
    if args.quick:
        horizons, args.steps, args.seq_len, args.batch_size = [96, 192], 6, 256, 4
    csvs = [str(DATA / f"{d}.csv") for d in DATASETS]
    started = time.perf_counter()
    runs = Path(args.keep_runs) if args.keep_runs else Path(tempfile.mkdtemp(prefix="timemoe-bench-"))
    try:
        moe_cfg = PRESETS["tiny"]
        dense_cfg = dense_equivalent(moe_cfg)
        common = [f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", f"train.lr={args.lr}",
                  f"train.seed={args.seed}", f"data.mixture={args.mixture}", "train.eval_every=0", "train.save_every=0", "train.eval_batches=2"]
        steps = args.steps or calibrate_steps(csvs, runs, common, args.train_minutes)
        common += [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 20)}"]
        dense_over = ["model.use_dense=true", f"model.intermediate_size={dense_cfg.intermediate_size}"]
        trained = {}
        for name, extra in (("time_moe", []), ("dense", dense_over)):
            print(f"\n== training {name}: {steps} steps of {args.batch_size} x {args.seq_len} points", flush=True)
            torch.manual_seed(args.seed)
            summary = train_forecaster(csvs, runs / name, "tiny", overrides=common + extra, progress=True)
            trained[name] = summary
            print(f"{name}: {summary['seconds'] / 60:.1f} min, {summary['parameters']:,} parameters, "
                  f"{summary['active_parameters']:,} active", flush=True)
        results, dlinear_seconds, windows = [], {}, {}
        for name in DATASETS:
            prepared = prepare(read_csv(DATA / f"{name}.csv"))
            period = season_length(prepared)  # steps per day: 24 (ETTh) or 96 (ETTm1)
            stride = max(1, period // args.windows_per_day)
            t0 = time.perf_counter()
            dlinear = DLinear(epochs=2 if args.quick else 10, max_train_windows=200 if args.quick else None)
            dlinear.fit(prepared, horizons, args.context)
            dlinear_seconds[name] = time.perf_counter() - t0
            methods = [ModelForecaster(trained["time_moe"]["model"], name="time_moe"),
                       ModelForecaster(trained["dense"]["model"], name="dense"),
                       dlinear, LastValue(), SeasonalNaive(period)]
            print(f"\n== evaluating on {name} (stride {stride})", flush=True)
            res = evaluate(prepared, methods, horizons, args.context, stride)
            windows[name] = stride
            results += res
            print(results_table(res), flush=True)
        total = time.perf_counter() - started
        report = build_report(args, steps, trained, results, windows, dlinear_seconds, total, horizons)
    finally:
        if not args.keep_runs:
            shutil.rmtree(runs, ignore_errors=True)
    print("\n" + report["markdown"])
    if args.quick:
        print("\n(--quick: nothing written)")
        return 0
    json_path, _ = write_results(NAME, report["json"], report["markdown"], RESULTS)
    plot(report["json"], RESULTS / f"{NAME}.png", report["curves"])
    print(f"wrote {json_path}, .md, .png")
    return 0


def render(results_dir: Path = RESULTS) -> int:
    """Rewrite <NAME>.json (targets recomputed from its results) and <NAME>.md from the committed JSON."""
    path = results_dir / f"{NAME}.json"
    if not path.is_file():
        print(f"--render needs {path} (run the benchmark first)", file=sys.stderr)
        return 2
    data = json.loads(path.read_text())
    data["targets"] = targets_for([EvalResult(**r) for r in data["results"]])
    json_path, md_path = write_results(NAME, data, markdown(data), results_dir)
    print(f"rewrote {json_path} and {md_path} (the plot needs the training curves: rerun the benchmark)")
    return 0


def calibrate_steps(csvs, runs: Path, common: list[str], minutes: float) -> int:
    """How many MoE steps fit `minutes`, from the time of a few steps (after one warm-up step)."""
    print("== calibrating the step time", flush=True)
    summary = train_forecaster(csvs, runs / "calibrate", "tiny", overrides=common + ["train.steps=4"], progress=False)
    lines = [json.loads(x) for x in (runs / "calibrate" / "metrics.jsonl").read_text().splitlines()]
    per_step = float(np.median([x["seconds"] for x in lines if "seconds" in x][1:]))
    shutil.rmtree(runs / "calibrate", ignore_errors=True)
    steps = max(10, int(minutes * 60 / per_step))
    print(f"{per_step:.2f} s per step -> {steps} steps in {minutes} min "
          f"({summary['parameters']:,} parameters)", flush=True)
    return steps


def averages(results, method: str, dataset: str | None = None) -> tuple[float, float]:
    rs = [r for r in results if r.method == method and (dataset is None or r.dataset == dataset)]
    return float(np.mean([r.mse for r in rs])), float(np.mean([r.mae for r in rs]))


def targets_for(results) -> list[dict]:
    """The benchmark's claims as _common targets (goals rounded to 4 places, as they are reported)."""
    moe_avg, dense_avg = averages(results, "time_moe")[0], averages(results, "dense")[0]
    targets = [target("time_moe average MSE / dense (equal active parameters) average MSE, all datasets and horizons",
                      moe_avg / dense_avg, 1.0, "<=")]
    for d in ("ETTh1", "ETTh2"):
        targets.append(target(f"time_moe average MSE on {d} vs DLinear's (goal) under the identical harness",
                              averages(results, "time_moe", d)[0], round(averages(results, "dlinear", d)[0], 4), "<="))
    return targets


def build_report(args, steps, trained, results, strides, dlinear_seconds, total, horizons) -> dict:
    models = {k: {"parameters": v["parameters"], "active_parameters": v["active_parameters"],
                  "train_seconds": round(v["seconds"], 1),
                  "final_train_loss": round(v["result"].last_metrics.get("loss", float("nan")), 4)}
              for k, v in trained.items()}
    curves = {}
    for k, v in trained.items():
        path = Path(v["result"].checkpoint).parent / "metrics.jsonl" if v["result"].checkpoint else None
        if path is not None and path.is_file():
            curves[k] = [json.loads(x)["loss"] for x in path.read_text().splitlines() if '"loss"' in x]
    data = {
        "benchmark": NAME,
        "command": command_line(),
        "machine": machine_info("cpu"),
        "total_seconds": round(total, 1),
        "setup": {"datasets": list(DATASETS), "train_split_only": True, "steps": steps, "batch_size": args.batch_size,
                  "seq_len": args.seq_len, "lr": args.lr, "mixture": args.mixture, "context": args.context, "horizons": horizons,
                  "eval_stride": strides, "moe": "tiny preset (hidden 64, intermediate 256, 4 layers, 4 heads, 8 experts top-2 + shared)",
                  "dense": f"same blocks, SwiGLU FFN of width {dense_equivalent(PRESETS['tiny']).intermediate_size}",
                  "dlinear": "per horizon, trained on each target's train split, early-stopped on its val split",
                  "dlinear_seconds": {k: round(v, 1) for k, v in dlinear_seconds.items()}},
        "models": models,
        "averages": {m: {d: dict(zip(("mse", "mae"), averages(results, m, d))) for d in DATASETS}
                     for m in dict.fromkeys(r.method for r in results)},
        "results": results_dicts(results),
        "targets": targets_for(results),
    }
    return {"json": data, "markdown": markdown(data), "curves": curves}


def markdown(data: dict) -> str:
    """The report, from the result JSON alone (so --render can rewrite it)."""
    setup, models, machine = data["setup"], data["models"], data["machine"]
    datasets = setup["datasets"]
    md = ["# Time-MoE on CPU: MoE vs dense (equal active parameters) vs baselines", "",
          f"`{data['command']}` on {machine['cores']} cores, torch {machine['torch']} ({machine['torch_threads']} threads), "
          f"{data['total_seconds'] / 60:.1f} min in all.", "",
          f"Both forecasters: {setup['steps']} steps x {setup['batch_size']} sequences of {setup['seq_len']} points from the train "
          f"splits of {', '.join(datasets)} (same batches, datasets mixed: {setup['mixture']}). MoE: {models['time_moe']['parameters']:,} parameters, "
          f"{models['time_moe']['active_parameters']:,} active; dense: {models['dense']['parameters']:,}. "
          f"Test windows once a day (stride {setup['eval_stride']}), context {setup['context']}; MSE / MAE on train-scaled values.", "",
          "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    md += [f"| {t['name']} | {t['value']:.4f} | {t['direction']} {t['goal']:.4f} | {'yes' if t['met'] else '**no**'} |"
           for t in data["targets"]]
    md += ["", "## Average over horizons", "", "| method | " + " | ".join(f"{d} MSE | {d} MAE" for d in datasets) + " |",
           "|---|" + "---|" * (2 * len(datasets))]
    for m, per in data["averages"].items():
        md.append(f"| {m} | " + " | ".join(f"{per[d]['mse']:.3f} | {per[d]['mae']:.3f}" for d in datasets) + " |")
    md += ["", "## Per horizon", "", results_table([EvalResult(**r) for r in data["results"]])]
    return "\n".join(md)


def plot(data: dict, path: Path, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, losses in curves.items():
        if losses:
            k = max(1, len(losses) // 50)
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax1.plot(np.arange(len(smooth)) + k, smooth, label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (Huber + aux)")
    ax1.set_title("training on ETTh1 + ETTh2 + ETTm1 train splits")
    ax1.legend()
    methods = list(data["averages"])
    datasets = list(data["setup"]["datasets"])
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax2.bar(np.arange(len(datasets)) + i * width, [data["averages"][m][d]["mse"] for d in datasets], width, label=m)
    ax2.set_xticks(np.arange(len(datasets)) + 0.4 - width / 2, datasets)
    ax2.set_ylabel("MSE (avg over horizons)")
    ax2.set_title("test MSE, same windows for every method")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
