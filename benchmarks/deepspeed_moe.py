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
training FLOPs (moe_vs_dense.training_flops_per_token; the MoS run also pays
the teacher's forward while KD is on). Corpora: tinyshakespeare
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
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS_DIR  # noqa: E402
from moe_vs_dense import corpora, lm_loss_fn, training_flops_per_token  # noqa: E402

from moekit.config import MoEConfig, to_dict  # noqa: E402
from moekit.data.text import batch_at  # noqa: E402
from moekit.models.decoder import DecoderLM, ModelConfig, count_parameters  # noqa: E402
from moekit.train.distill import DistillConfig, distill_lm, kd_steps  # noqa: E402
from moekit.train.lm import RunConfig, evaluate, prepare_data  # noqa: E402
from moekit.train.loop import TrainConfig, fit  # noqa: E402

NAME = "deepspeed_moe"
FLOPS_RATIO_GOAL, PARAMS_RATIO_GOAL, LOSS_GAP_GOAL, THROUGHPUT_GOAL = 0.5, 3.0, 0.01, 0.8
NEVER = 99.0  # the FLOPs ratio recorded when a run never reaches the dense final loss
STANDARD = ("moe16_top1", "moe32_top4", "moe32_top4_alf", "moe32_top3_shared", "moe64_top7_shared",
            "moe32_top3_shared_alf")
REFERENCE = "moe16_top1"  # the standard MoE the size claim compares with (the paper's top-1 baseline)
STAGES = {"dense": ("dense",), "moe": STANDARD, "prmoe": ("prmoe",), "mos": ("mos",)}


@dataclass
class Scale:
    hidden: int
    layers: int
    heads: int
    width: int  # W: the dense FFN width = active FFN width of every model
    steps: int
    batch_size: int
    seq_len: int
    warmup: int
    evals: int
    eval_batches: int
    max_bytes: int
    throughput_rounds: int
    throughput_steps: int


# 1200 steps x 16 x 128 tokens = 2.46M tokens: 4x the earlier moe_vs_dense run (300 steps of the same batch); the
# model is a little narrower than that run's (hidden 96, W 384 vs 128, 512) so that 6 runs of 4x the tokens fit in
# ~90 min per corpus on one core (~0.5 s per step on a quiet core)
FULL = Scale(hidden=96, layers=4, heads=4, width=384, steps=1200, batch_size=16, seq_len=128, warmup=60, evals=24,
             eval_batches=6, max_bytes=2_000_000, throughput_rounds=7, throughput_steps=2)
# --scale long: the compute claim at 4x FULL's tokens again (16x the earlier experiment), on 16 MB of text so that no
# byte is seen twice (9.8M training tokens); evaluated on 2.7x the validation tokens, since crossings are read off it
LONG = replace(FULL, steps=4800, warmup=240, evals=32, eval_batches=16, max_bytes=16_000_000)
QUICK = Scale(hidden=64, layers=2, heads=4, width=128, steps=16, batch_size=8, seq_len=64, warmup=2, evals=4,
              eval_batches=2, max_bytes=200_000, throughput_rounds=2, throughput_steps=1)


# ---------------------------------------------------------------- models


def model_config(name: str, s: Scale, vocab_size: int) -> ModelConfig:
    """The run's ModelConfig: everything but the FFN identical, active FFN width W everywhere."""
    W = s.width
    base = dict(vocab_size=vocab_size, hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                num_kv_heads=s.heads, max_seq_len=s.seq_len, dense_hidden=W)
    # router probabilities as gate weights, not renormalised over the top-k (a renormalised top-1 weight is 1)
    moe = dict(norm_topk_prob=False)
    if name == "dense":
        return ModelConfig(ffn="dense", **base)
    if name == "moe16_top1":
        return ModelConfig(ffn="moe", moe=MoEConfig(num_experts=16, top_k=1, expert_hidden=W, **moe), **base)
    if name == "moe32_top4":
        return ModelConfig(ffn="moe", moe=MoEConfig(num_experts=32, top_k=4, expert_hidden=W // 4, **moe), **base)
    if name in ("moe32_top3_shared", "moe64_top7_shared"):
        E = 32 if name.startswith("moe32") else 64
        slots = E // 8  # active experts of width W / slots: one shared, the rest routed
        cfg = MoEConfig(num_experts=E, top_k=slots - 1, expert_hidden=W // slots, num_shared_experts=1, **moe)
        return ModelConfig(ffn="moe", moe=cfg, **base)
    if name == "moe32_top4_alf":
        cfg = MoEConfig(num_experts=32, top_k=4, expert_hidden=W // 4, bias_update_rate=1e-3, balance_loss="none", **moe)
        return ModelConfig(ffn="moe", moe=cfg, **base)
    if name == "moe32_top3_shared_alf":
        cfg = MoEConfig(num_experts=32, top_k=3, expert_hidden=W // 4, num_shared_experts=1, bias_update_rate=1e-3,
                        balance_loss="none", **moe)
        return ModelConfig(ffn="moe", moe=cfg, **base)
    if name in ("prmoe", "mos"):
        layers = s.layers - (name == "mos")
        base.update(num_layers=layers, dense_hidden=W // 2)
        return ModelConfig(ffn="residual_moe", pyramid=[8, 16], pyramid_layers=[layers - 1, 1],
                           moe=MoEConfig(num_experts=16, top_k=1, expert_hidden=W // 2, **moe), **base)
    raise ValueError(f"unknown model {name!r}")


def train_config(s: Scale, lr: float, seed: int = 0, budget: float = 1.0) -> TrainConfig:
    """budget < 1: a shorter run with its own warmup + cosine schedule (evaluated at the same step spacing)."""
    return TrainConfig(steps=max(1, round(s.steps * budget)), batch_size=s.batch_size, seq_len=s.seq_len, lr=lr, min_lr_ratio=0.1,
                       warmup_steps=s.warmup, eval_every=max(1, s.steps // s.evals), eval_batches=s.eval_batches,
                       save_every=0, keep_last=1, seed=seed, device="cpu")


def run_name(name: str, lr: float, budget: float = 1.0) -> str:
    return f"{name}_lr{lr:g}" + (f"_b{budget:g}" if budget != 1.0 else "")


# ---------------------------------------------------------------- training stages


def train_run(name: str, s: Scale, data, lr: float, work: Path, budget: float = 1.0) -> dict:
    """One model with moekit's `fit`, evaluated every tc.eval_every steps; its curve against training FLOPs."""
    tc = train_config(s, lr, budget=budget)
    cfg = model_config(name, s, data.tokenizer.vocab_size)
    torch.manual_seed(tc.seed)
    model = DecoderLM(cfg)
    fpt, tokens = training_flops_per_token(cfg, tc.seq_len), tc.batch_size * tc.seq_len
    curve = [{"step": 0, "flops": 0, "val_loss": evaluate(model, data.val, tc, cfg)["val_loss"]}]

    def eval_fn(m, step):
        val = evaluate(m, data.val, tc, cfg)["val_loss"]
        curve.append({"step": step, "flops": step * tokens * fpt, "val_loss": val})
        return {"val_loss": val}

    started = time.perf_counter()
    fit(model, tc, batch_fn=lambda i: batch_at(data.train, i, tc.batch_size, tc.seq_len, tc.seed),
        loss_fn=lm_loss_fn(tc), run_dir=work / run_name(name, lr, budget), config_dict={"model": to_dict(cfg), "train": to_dict(tc)},
        eval_fn=eval_fn, tokenizer=data.tokenizer, progress=False, tokens_per_batch=tokens)
    return summary(name, lr, cfg, model, curve, time.perf_counter() - started, fpt, budget=budget)


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
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    result = distill_lm(teacher_dir, cfg, out, DistillConfig(kd_stop=kd_stop), progress=False)
    student_cfg = result["config"].model
    teacher_cfg = model_config("prmoe", s, student_cfg.vocab_size)
    fpt = training_flops_per_token(student_cfg, tc.seq_len)
    teacher_fwd = training_flops_per_token(teacher_cfg, tc.seq_len) // 3  # forward only: a third of 6N (+ attention)
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


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def load_runs(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def best_by_model(runs: list[dict]) -> dict[str, dict]:
    """Per model, the full-budget run of its best learning rate (lowest final validation loss): the LR tuned per model."""
    best: dict[str, dict] = {}
    for r in (r for r in runs if r.get("budget", 1.0) == 1.0):
        if r["name"] not in best or r["final_val_loss"] < best[r["name"]]["final_val_loss"]:
            best[r["name"]] = r
    return best


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
    from _deepspeed_moe_report import report

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
