"""Benchmark: one multi-task MoE with task-guided routing vs multi-task dense vs one dense model per task.

JiuZhang 2.0 (Zhao et al., KDD 2023) trains one MoE for many math tasks with
routing guided by the task. This script reproduces the comparison at small
scale on moekit's generated math suite (moekit.data.mathtasks: arithmetic,
word problems, linear equations, unit conversion, comparison), with
`moekit train`'s own recipe (data.kind=math_tasks, train/multitask.py):

  - moe_task:    8 experts, top-2, expert width dense_hidden / 2, router=task (a learned task
                 embedding added to the router input); all tasks in one model;
  - dense_multi: a dense SwiGLU FFN of width dense_hidden (the same active parameters); all tasks;
  - dense_each:  one dense_multi-shaped model per task, trained on that task alone;
  - moe_plain:   (extra row, no target) the same MoE with the plain top-k router: no task information.

All share attention, embeddings, head, LR schedule and seed. The multi-task
runs sample tasks with p_i ~ n_i ** (1 / T); task i's own dense model gets
steps * p_i steps, so the total training tokens are equal (and each task is
seen about as often). Every model is scored by greedy exact match on the same
test problems (disjoint from training).

Targets (issue #17): the MoE beats the multi-task dense model on the average
and on >= 4 of the 5 tasks, and is within 1 point of the per-task dense
models' average.

Run from the repository root:
    python benchmarks/multitask.py            # the full run (~20 min single-threaded on a busy 2-core machine)
    python benchmarks/multitask.py --quick    # a tiny end-to-end check (~1 min); writes nothing
    python benchmarks/multitask.py --variant moe_task_2x_steps   # one ablation model (see VARIANTS); writes nothing
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import command_line, machine_info, markdown_table, target, write_results  # noqa: E402

from moekit.config import MoEConfig  # noqa: E402
from moekit.data.mathtasks import TASKS, task_probabilities  # noqa: E402
from moekit.models.decoder import ModelConfig, count_parameters  # noqa: E402
from moekit.train.lm import DataConfig, RunConfig, train_lm  # noqa: E402
from moekit.train.loop import TrainConfig  # noqa: E402
from moekit.train.multitask import MathTasksConfig, build_suite, exact_match  # noqa: E402

NAME = "multitask"


@dataclass
class Scale:
    hidden: int
    layers: int
    heads: int
    dense_hidden: int  # dense FFN width; the MoE's top_k * expert width equals it
    steps: int  # multi-task training steps
    batch_size: int
    seq_len: int
    train_sizes: tuple[int, ...]
    test_size: int
    temperature: float
    lr: float


FULL = Scale(hidden=64, layers=2, heads=4, dense_hidden=192, steps=1500, batch_size=16, seq_len=96,
             train_sizes=(6000, 4000, 3000, 1500, 2000), test_size=200, temperature=2.0, lr=6e-3)
QUICK = Scale(hidden=32, layers=1, heads=2, dense_hidden=64, steps=20, batch_size=8, seq_len=96,
              train_sizes=(300, 200, 200, 100, 100), test_size=10, temperature=2.0, lr=3e-3)


def run_config(kind: str, s: Scale, tasks: tuple[str, ...], steps: int, seed: int) -> RunConfig:
    sizes = [s.train_sizes[TASKS.index(t)] for t in tasks]
    ffn, router = ("dense", "topk") if kind == "dense" else ("moe", "task" if kind == "moe_task" else "topk")
    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden=s.dense_hidden // 2, router=router,
                    num_groups=len(tasks) if router == "task" else 1)
    model = ModelConfig(hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads, num_kv_heads=s.heads // 2 or 1,
                        max_seq_len=max(128, s.seq_len), dense_hidden=s.dense_hidden, ffn=ffn, moe=moe)
    train = TrainConfig(steps=steps, batch_size=s.batch_size, seq_len=s.seq_len, lr=s.lr, warmup_steps=min(50, steps // 10),
                        eval_every=0, eval_batches=1, save_every=0, seed=seed)
    math = MathTasksConfig(tasks=list(tasks), train_sizes=sizes, test_size=s.test_size, task_temperature=s.temperature,
                           eval_problems=1)
    return RunConfig(model, train, DataConfig(kind="math_tasks", math=math))


def train_and_score(cfg: RunConfig, work: Path, name: str) -> dict:
    started = time.perf_counter()
    summary = train_lm(cfg, work / name, progress=False)
    model = summary["model"]
    seconds = time.perf_counter() - started
    em = exact_match(model, build_suite(cfg.data.math))
    params = count_parameters(model)
    print(f"  {name}: {cfg.train.steps} steps in {seconds / 60:.1f} min, exact match "
          + ", ".join(f"{k} {100 * v:.1f}" for k, v in em.items()), flush=True)
    val_loss = summary["result"].last_eval.get("val_loss")  # answer-token cross-entropy on test rows (nats)
    return {"exact_match": em, "val_loss": val_loss, "steps": cfg.train.steps, "seconds": round(seconds, 1), "params": params,
            "tokens": cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len}


def run(s: Scale, seed: int, work: Path, extras: bool) -> dict:
    tasks = TASKS
    out = {}
    kinds = ["moe_task", "dense"] + (["moe_plain"] if extras else [])
    for kind in kinds:
        name = {"dense": "dense_multi"}.get(kind, kind)
        out[name] = train_and_score(run_config(kind, s, tasks, s.steps, seed), work, name)
    probs = task_probabilities(s.train_sizes, s.temperature)
    each = {}
    for task, p in zip(tasks, probs):
        steps = max(1, round(s.steps * p))
        each[task] = train_and_score(run_config("dense", s, (task,), steps, seed), work, f"dense_{task}")
    out["dense_each"] = {
        "exact_match": {**{t: each[t]["exact_match"][t] for t in tasks},
                        "mean": sum(each[t]["exact_match"][t] for t in tasks) / len(tasks)},
        "val_loss": None, "steps": sum(e["steps"] for e in each.values()), "tokens": sum(e["tokens"] for e in each.values()),
        "seconds": round(sum(e["seconds"] for e in each.values()), 1), "params": each[tasks[0]]["params"],
        "per_task_runs": {t: {k: v for k, v in e.items() if k != "exact_match"} for t, e in each.items()},
    }
    return out


def targets_for(models: dict) -> list[dict]:
    moe, dense, each = (models[k]["exact_match"] for k in ("moe_task", "dense_multi", "dense_each"))
    wins = sum(moe[t] > dense[t] for t in TASKS)
    return [
        target("moe_task mean exact match - dense_multi mean (points; > 0: the MoE beats it)",
               100 * (moe["mean"] - dense["mean"]), 0.1, ">="),
        target("tasks where moe_task beats dense_multi", wins, 4, ">="),
        target("moe_task mean exact match - per-task dense models' mean (points)", 100 * (moe["mean"] - each["mean"]),
               -1.0, ">="),
    ]


def markdown(result: dict) -> str:
    rows = []
    for name, m in result["models"].items():
        em = m["exact_match"]
        loss = "per task" if m["val_loss"] is None else f"{m['val_loss']:.3f}"
        rows.append([name, *(f"{100 * em[t]:.1f}" for t in TASKS), f"{100 * em['mean']:.1f}", loss, f"{m['params']['active']:,}",
                     f"{m['params']['total']:,}", f"{m['tokens']:,}"])
    table = markdown_table(["model", *TASKS, "mean", "answer val loss", "active params", "total params", "training tokens"], rows)
    checks = markdown_table(["target", "value", "goal", "met"],
                            [[t["name"], t["value"], f"{t['direction']} {t['goal']}", t["met"]] for t in result["targets"]])
    return (f"# Multi-task math: task-guided MoE vs dense (JiuZhang 2.0 at small scale)\n\n"
            f"Greedy exact match (%) on {result['scale']['test_size']} test problems per task. "
            f"Command: `{result['command']}`; load average {result['machine']['load_average_1m']} "
            f"({result['note']}).\n\n{table}\n\n{checks}\n")


# Single-model ablations (`--variant NAME`): what bounds the MoE at this scale; print only, write nothing.
VARIANTS = {"moe_plain": ("moe_plain", 1.0, 1.0), "moe_task_half_lr": ("moe_task", 1.0, 0.5),
            "moe_task_2x_steps": ("moe_task", 2.0, 1.0), "dense_multi_2x_steps": ("dense", 2.0, 1.0),
            "dense_multi_half_lr": ("dense", 1.0, 0.5)}


def run_variant(name: str, s: Scale, seed: int) -> dict:
    kind, steps_factor, lr_factor = VARIANTS[name]
    cfg = run_config(kind, s, TASKS, round(s.steps * steps_factor), seed)
    cfg = replace(cfg, train=replace(cfg.train, lr=s.lr * lr_factor))
    with tempfile.TemporaryDirectory(prefix="moekit_multitask_") as work:
        return train_and_score(cfg, Path(work), name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny end-to-end check; writes nothing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-extras", action="store_true", help="skip the moe_plain row (no target)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--variant", choices=VARIANTS, help="train and score one ablation model only (writes nothing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    if args.variant:
        run_variant(args.variant, s, args.seed)
        return
    with tempfile.TemporaryDirectory(prefix="moekit_multitask_") as work:
        models = run(s, args.seed, Path(work), extras=not args.no_extras)
    result = {"models": models, "scale": s.__dict__, "seed": args.seed, "machine": machine_info(),
              "command": command_line(), "note": "quality figures; timings are not the point and were taken under load"}
    result["targets"] = targets_for(models)
    for t in result["targets"]:
        print(f"{'MET ' if t['met'] else 'MISS'} {t['name']}: {t['value']} (goal {t['direction']} {t['goal']})")
    if args.quick:
        print("(--quick: nothing written)")
        return
    paths = write_results(NAME, result, markdown(result))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
