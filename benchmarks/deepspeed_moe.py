"""Benchmark: DeepSpeed-MoE's claims on moekit, at equal active parameters, staged so parts can be rerun.

DeepSpeed-MoE (Rajbhandari et al., 2022) claims (1) an MoE reaches a dense
model's quality at ~5x less training compute, (2) PR-MoE (a pyramid of expert
counts, Residual-MoE top-1) plus a Mixture-of-Students (a shallower student
distilled from it) shrink the model up to 3.7x at equal quality, (3) fast
MoE training. Every run here has the same active parameters per token
(attention, embeddings and head identical; FFN width W per layer):
  dense                  SwiGLU MLP of width W;
  moe16_top1             16 experts of width W, top-1 (Switch / DeepSpeed-MoE's standard MoE);
  moe32_top4             32 fine-grained experts of width W/4, top-4;
  moe32_top4_alf         moe32_top4 with aux-loss-free balancing (bias_update_rate, no balance loss);
  moe32_top3_shared      32 of width W/4, top-3, + 1 shared expert of width W/4 (DeepSeekMoE's shared expert);
  moe64_top7_shared      64 of width W/8, top-7, + 1 shared of width W/8: finer still, the same total parameters;
  moe32_top3_shared_alf  32 of width W/4, top-3, + 1 shared expert of width W/4, aux-loss-free balancing
                         (bias_update_rate, no balance loss): what the field learned since 2022;
  prmoe                  Residual-MoE (dense MLP W/2 + one routed expert W/2, top-1), 8 experts per layer
                         then 16 in the last layer;
  mos                    the PR-MoE with one layer fewer, distilled from `prmoe` by `moekit distill`'s recipe
                         (LM loss + KL to the teacher for the first --kd-stop of the steps).
Same data, seeds, token budget and schedule; validation loss against analytic
training FLOPs (moekit.train.flops.training_flops_per_token; the MoS run also pays
the teacher's forward while KD is on). Names, scales and models are in
_deepspeed_moe_setup.py, the report in _deepspeed_moe_report.py; runs, curves,
throughput and plots are the shared training-comparison harness's (_harness.py). Corpora: tinyshakespeare
(../shared/data/text, skipped when absent) and the Python standard library.

Stages: `--stage dense|moe|prmoe|mos|report|all`; each training stage writes
one JSON per run (curve + summary) under the results root, so a stage can be
rerun alone (and the corpora can train in parallel, one process each, with
--corpus); `report` reads what is there, times training tokens/s of the
trained checkpoints (interleaved, paired with dense), computes the targets and
writes benchmarks/results/deepspeed_moe.{json,md} + one PNG per corpus.
--quick: a tiny end-to-end smoke run; everything goes to the work dir, nothing
into benchmarks/results. Run from the repository root:
    python benchmarks/deepspeed_moe.py --quick                      # smoke test, ~1 minute
    python benchmarks/deepspeed_moe.py --stage all --corpus tinyshakespeare &   # the full run: one process
    python benchmarks/deepspeed_moe.py --stage all --corpus python-stdlib &     # per corpus, in parallel
    wait; python benchmarks/deepspeed_moe.py --stage report         # then the report, on a quiet machine
    (--lrs 1.5e-3,3e-3,6e-3 tunes the learning rate per model, at 3x the time)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS_DIR  # noqa: E402
from _deepspeed_moe_report import report  # noqa: E402
from _deepspeed_moe_setup import (FULL, LONG, NAME, QUICK, STAGES, Scale, best_by_model, model_config,  # noqa: E402,F401
                                  run_name, train_config)
from _harness import corpora, load_runs, save_json, train_curve  # noqa: E402

from moekit.models.decoder import DecoderLM, count_parameters  # noqa: E402
from moekit.train.distill import DistillConfig, distill_lm, kd_steps  # noqa: E402
from moekit.train.flops import forward_flops_per_token, training_flops_per_token  # noqa: E402
from moekit.train.lm import RunConfig, evaluate, prepare_data  # noqa: E402

# ---------------------------------------------------------------- training stages


def train_run(name: str, s: Scale, data, lr: float, work: Path, budget: float = 1.0) -> dict:
    """One model with moekit's `fit`, evaluated every tc.eval_every steps; its curve against training FLOPs."""
    tc = train_config(s, lr, budget=budget)
    cfg = model_config(name, s, data.tokenizer.vocab_size)
    torch.manual_seed(tc.seed)
    model = DecoderLM(cfg)
    fpt = training_flops_per_token(cfg, tc.seq_len)
    curve, seconds = train_curve(model, tc, train_tokens=data.train, flops_per_token=fpt,
                                 run_dir=work / run_name(name, lr, budget), tokenizer=data.tokenizer,
                                 evaluate=lambda m: {"val_loss": evaluate(m, data.val, tc, cfg)["val_loss"]})
    return summary(name, lr, cfg, model, curve, seconds, fpt, budget=budget)


def summary(name, lr, cfg, model, curve, seconds, fpt, **extra) -> dict:
    return {"name": name, "lr": lr, "params": count_parameters(model), "flops_per_token": fpt,
            "final_val_loss": curve[-1]["val_loss"], "total_flops": curve[-1]["flops"], "train_seconds": round(seconds, 1),
            "experts_per_layer": cfg.experts_per_layer, "curve": curve, **extra}


def distill_run(s: Scale, dcfg, lr: float, teacher: dict, work: Path, kd_stop: float) -> dict:
    """The MoS student via moekit.train.distill (the recipe `moekit distill` runs), from the trained PR-MoE."""
    tc = replace(train_config(s, lr), save_every=0)
    teacher_dir = work / run_name("prmoe", teacher["lr"])
    if not teacher_dir.exists():
        raise SystemExit(f"the MoS stage needs the PR-MoE teacher's checkpoint in {teacher_dir}: run --stage prmoe first")
    cfg = RunConfig(model=model_config("mos", s, 257), train=tc, data=dcfg)
    out = work / run_name("mos", lr)
    shutil.rmtree(out, ignore_errors=True)
    result = distill_lm(teacher_dir, cfg, out, DistillConfig(kd_stop=kd_stop), progress=False)
    student_cfg = result["config"].model
    teacher_cfg = model_config("prmoe", s, student_cfg.vocab_size)
    fpt = training_flops_per_token(student_cfg, tc.seq_len)
    teacher_fwd = forward_flops_per_token(teacher_cfg, tc.seq_len)  # forward only: a third of 6N (+ attention)
    tokens, until = tc.batch_size * tc.seq_len, kd_steps(kd_stop, tc.steps)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], "flops": r["step"] * tokens * fpt + min(r["step"], until) * tokens * teacher_fwd,
              "val_loss": r["val_loss"]} for r in rows if "val_loss" in r]
    return summary("mos", lr, student_cfg, result["model"], curve, result["seconds"], fpt, kd_stop=kd_stop, kd_steps=until,
                   teacher_forward_flops_per_token=teacher_fwd)


def run_stage(stage: str, s: Scale, lrs: list[float], root: Path, work: Path, only: list[str] | None, kd_stop: float,
              models: list[str] | None = None, budgets: tuple[float, ...] = (1.0,)) -> None:
    found, skipped = corpora(s)
    for corpus, dcfg in found.items():
        if only and corpus not in only:
            continue
        data = prepare_data(dcfg, s.seq_len)
        for name in STAGES[stage]:
            if models and name not in models:
                continue
            for lr, budget in [(lr, b) for lr in lrs for b in (budgets if name not in ("dense", "mos") else (1.0,))]:
                print(f"[{corpus}] {name} lr={lr:g} budget={budget:g} ...", flush=True)
                if name == "mos":
                    teacher = best_by_model(load_runs(root / corpus)).get("prmoe")
                    if teacher is None:
                        raise SystemExit(f"no PR-MoE curve in {root / corpus}: run --stage prmoe first")
                    result = distill_run(s, dcfg, lr, teacher, work / corpus, kd_stop)
                else:
                    result = train_run(name, s, data, lr, work / corpus, budget)
                save_json(root / corpus / f"{run_name(name, lr, budget)}.json", result)
                print(f"  final val loss {result['final_val_loss']:.4f} in {result['train_seconds']:.0f} s", flush=True)
    for corpus, why in skipped.items():
        print(f"skipped {corpus}: {why}")


# ---------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", default="all", choices=[*STAGES, "report", "all"])
    p.add_argument("--quick", action="store_true", help="tiny smoke run; writes only under --work")
    p.add_argument("--scale", default="full", choices=["full", "long"],
                   help="full: 1200 steps on 2 MB per corpus (default); long: 4800 steps on 16 MB, results in "
                        f"{NAME}_long.*, meant for --corpus python-stdlib (tinyshakespeare is 1 MB: it would repeat)")
    p.add_argument("--corpus", action="append", help="only this corpus (tinyshakespeare, python-stdlib); repeatable")
    p.add_argument("--model", action="append", choices=[n for names in STAGES.values() for n in names],
                   help="only this model of the stage(s); repeatable")
    p.add_argument("--lrs", default="3e-3", help="comma-separated learning rates; each model keeps its best (default 3e-3)")
    p.add_argument("--budgets", default="1",
                   help="comma-separated fractions of the dense steps for the MoE runs, each with its own schedule, e.g. "
                        "1,0.5,0.35: a short run whose final loss matches dense shows the compute claim without the "
                        "bias of reading an unfinished cosine schedule (default 1)")
    p.add_argument("--kd-stop", type=float, default=0.5, help="MoS: fraction of the steps with KD (default 0.5)")
    p.add_argument("--work", type=Path, default=None, help="checkpoints (default: a folder in the temp dir)")
    p.add_argument("--under-load", action="store_true", help="mark the tokens/s as measured on a shared, busy machine")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else LONG if args.scale == "long" else FULL
    name = NAME + ("_long" if args.scale == "long" else "")
    work = args.work or Path(tempfile.gettempdir()) / f"moekit_{name}{'_quick' if args.quick else ''}"
    work = work / "long" if args.scale == "long" and args.work else work  # never mix the scales' checkpoints
    root = work / "curves" if args.quick else RESULTS_DIR / name
    lrs = [float(x) for x in args.lrs.split(",") if x]
    stages = list(STAGES) if args.stage == "all" else [args.stage] if args.stage != "report" else []
    for stage in stages:
        run_stage(stage, s, lrs, root, work, args.corpus, args.kd_stop, args.model,
                  tuple(float(b) for b in args.budgets.split(",") if b))
    if args.stage == "all" and args.corpus:
        print("trained the runs of --corpus only: once every corpus is done, write the report with --stage report")
    elif args.stage in ("report", "all"):
        out_dir = work / "report" if args.quick else RESULTS_DIR
        report(s, root, work, out_dir, quick=args.quick, scale=asdict(s), lrs=lrs, under_load=args.under_load, name=name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
