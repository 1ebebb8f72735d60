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
    python benchmarks/multitask.py --variant moe_task_2x_steps   # one ablation model (see VARIANTS)
    python benchmarks/multitask.py --report   # rebuild results/multitask.md from the saved JSON; trains nothing

Results: the full run writes results/multitask.{json,md}; each `--variant NAME` run saves
results/multitask/NAME.json and rebuilds multitask.md, whose ablation table is assembled from whatever
variant files exist (naming those that do not). Ablation figures recorded before variants were saved are
kept in the report only in their own, labelled section (RECORDED_ABLATIONS), never as computed rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS_DIR, command_line, machine_info, markdown_table, target, write_results  # noqa: E402
from _harness import save_json, targets_markdown  # noqa: E402

from moekit.infer.answers import greedy_answers  # noqa: E402
from moekit.config import MoEConfig  # noqa: E402
from moekit.data.mathtasks import TASKS, task_probabilities  # noqa: E402
from moekit.models.decoder import ModelConfig, count_parameters  # noqa: E402
from moekit.train.lm import DataConfig, RunConfig, train_lm  # noqa: E402
from moekit.train.loop import TrainConfig  # noqa: E402
from moekit.train.multitask import MathTasksConfig, build_suite, exact_match  # noqa: E402

NAME = "multitask"
VARIANTS_DIR = RESULTS_DIR / NAME  # one <variant>.json per `--variant` run


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
    em = exact_match(model, build_suite(cfg.data.math), greedy_answers)  # greedy answers through the engine's decode
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
    checks = targets_markdown(result["targets"])
    return (f"# Multi-task math: task-guided MoE vs dense (JiuZhang 2.0 at small scale)\n\n"
            f"Greedy exact match (%) on {result['scale']['test_size']} test problems per task. "
            f"Command: `{result['command']}`; load average {result['machine']['load_average_1m']} "
            f"({result['note']}).\n\n{table}\n\n{checks}\n")


# Single-model ablations (`--variant NAME`): what bounds the MoE at this scale; each saves VARIANTS_DIR/NAME.json.
VARIANTS = {"moe_plain": ("moe_plain", 1.0, 1.0), "moe_task_half_lr": ("moe_task", 1.0, 0.5),
            "moe_task_2x_steps": ("moe_task", 2.0, 1.0), "dense_multi_2x_steps": ("dense", 2.0, 1.0),
            "dense_multi_half_lr": ("dense", 1.0, 0.5)}


def run_variant(name: str, s: Scale, seed: int) -> dict:
    """Train and score ablation `name`; the record `save_variant` writes (the model's figures plus its settings)."""
    kind, steps_factor, lr_factor = VARIANTS[name]
    cfg = run_config(kind, s, TASKS, round(s.steps * steps_factor), seed)
    cfg = replace(cfg, train=replace(cfg.train, lr=s.lr * lr_factor))
    with tempfile.TemporaryDirectory(prefix="moekit_multitask_") as work:
        model = train_and_score(cfg, Path(work), name)
    return {"variant": name, "kind": kind, "lr": cfg.train.lr, "seed": seed, "scale": s.__dict__, "model": model,
            "machine": machine_info(), "command": command_line()}


def save_variant(record: dict, directory: Path = VARIANTS_DIR) -> Path:
    """Write one variant's record as directory/<variant>.json (atomically)."""
    path = Path(directory) / f"{record['variant']}.json"
    save_json(path, record)
    return path


def load_variants(directory: Path = VARIANTS_DIR) -> tuple[dict[str, dict], list[str]]:
    """The saved variant records by name (in VARIANTS order) and the names with no saved record."""
    found = {n: json.loads((Path(directory) / f"{n}.json").read_text()) for n in VARIANTS
             if (Path(directory) / f"{n}.json").is_file()}
    return found, [n for n in VARIANTS if n not in found]


def ablation_markdown(main_result: dict | None, directory: Path = VARIANTS_DIR) -> str:
    """The ablation table assembled from the saved variant records (and the main run's moe_task row)."""
    found, missing = load_variants(directory)
    pct = lambda em: [f"{100 * em[t]:.1f}" for t in (*TASKS, "mean")]  # noqa: E731
    rows = []
    if main_result is not None:
        m = main_result["models"]["moe_task"]
        rows.append(["moe_task (the main run above)", m["steps"], f"{main_result['scale']['lr']:g}", main_result["seed"],
                     *pct(m["exact_match"]), main_result["machine"].get("load_average_1m")])
    for name, v in found.items():
        rows.append([name, v["model"]["steps"], f"{v['lr']:g}", v["seed"], *pct(v["model"]["exact_match"]),
                     v["machine"].get("load_average_1m")])
    text = (f"## Ablations (single-model runs, `python benchmarks/multitask.py --variant NAME`, saved in "
            f"results/{NAME}/NAME.json)\n\nExact match (%) on the same test problems per task; quality figures only.\n\n")
    text += markdown_table(["variant", "steps", "lr", "seed", *TASKS, "mean", "load average"], rows) if rows else \
        "No saved results yet."
    if missing:
        text += f"\n\nNot run (no saved result; `--variant NAME` saves one): {', '.join(missing)}."
    return text + "\n"


# Figures of the variants as recorded by hand (commit 6e2ab31) from runs that saved no raw results; shown
# only under their own heading, never as rows of the table above.
RECORDED_ABLATIONS = """## Ablations recorded from earlier runs, not regenerated

These figures were copied by hand into results/multitask.md at commit 6e2ab31 from the printed output of
`python benchmarks/multitask.py --variant NAME` runs (one at a time or 2-3 at once on the shared 2-core
machine, load 4-13). Those runs saved no raw results, so nothing here is computed by this script; the table
above holds only variants rerun since then. Exact match (%) on the same 200 test problems per task.

| variant (as recorded) | arithmetic | word_problems | linear_equations | unit_conversion | comparison | mean |
|---|---|---|---|---|---|---|
| moe_task (the main run, lr 6e-3) | 6.0 | 2.5 | 13.5 | 3.0 | 1.5 | 5.3 |
| moe_plain (top-k router, no task information, lr 6e-3) | 6.5 | 2.5 | 11.0 | 4.0 | 15.0 | 7.8 |
| moe_task_half_lr (lr 3e-3) | 7.0 | 3.5 | 8.0 | 5.0 | 27.0 | 10.1 |
| dense_multi_half_lr (lr 3e-3) | 3.0 | 3.0 | 15.5 | 12.5 | 20.5 | 10.9 |
| moe_task_2x_steps (3000 steps, twice the tokens) | 18.0 | 2.5 | 14.5 | 23.5 | 11.0 | 13.9 |
| dense_multi_2x_steps (3000 steps, twice the tokens) | 3.5 | 2.5 | 14.5 | 40.0 | 21.5 | 16.4 |

What bounded it, as written with those figures: at this budget every model is still optimisation-limited
(accuracies 2-14%, and doubling the MoE's steps raises it from 5.3% to 13.9%). The MoE is more sensitive to the
learning rate than the dense model (at lr 3e-3 it goes from 5.3% to 10.1%, the dense model from 9.6% to 10.9%),
so with each model at the better of the two learning rates the MoE still trails the multi-task dense model by
0.8 points and beats it on 3 of 5 tasks (arithmetic, word problems, comparison). At twice the steps both improve
and the dense model stays ahead (16.4% vs 13.9%; the MoE wins arithmetic 18.0 vs 3.5, ties two tasks, loses unit
conversion and comparison). At lr 6e-3 the task embedding did not help (moe_plain 7.8% > moe_task 5.3%). The
per-task dense models lose to both multi-task models because each sees only its share of the token budget
(208-417 steps). The issue's targets need a scale where the models leave this regime; that was not affordable here.
"""


def report(result: dict | None, directory: Path = VARIANTS_DIR) -> str:
    """The whole multitask.md: the main run's tables (when there is one), the saved ablations, the recorded ones."""
    head = markdown(result) if result is not None else "# Multi-task math: task-guided MoE vs dense\n\nNo main run saved.\n"
    return f"{head}\n{ablation_markdown(result, directory)}\n{RECORDED_ABLATIONS}"


def write_report(results_dir: Path = RESULTS_DIR) -> Path:
    """Rebuild <results_dir>/multitask.md from multitask.json and <results_dir>/multitask/*.json; trains nothing."""
    main_json = Path(results_dir) / f"{NAME}.json"
    result = json.loads(main_json.read_text()) if main_json.is_file() else None
    return _write_text(Path(results_dir) / f"{NAME}.md", report(result, Path(results_dir) / NAME))


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny end-to-end check; writes nothing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-extras", action="store_true", help="skip the moe_plain row (no target)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--variant", choices=VARIANTS, help="train and score one ablation model only (saves its JSON)")
    parser.add_argument("--report", action="store_true", help="rebuild results/multitask.md from the saved JSON only")
    args = parser.parse_args()
    if args.report:
        print(f"wrote {write_report()}")
        return
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    if args.variant:
        record = run_variant(args.variant, s, args.seed)
        if not args.quick:
            print(f"wrote {save_variant(record)} and {write_report()}")
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
    paths = write_results(NAME, result, report(result))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
