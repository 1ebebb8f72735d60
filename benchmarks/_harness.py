"""The training-comparison harness: what the benchmarks that train model variants and compare them share.

moe_vs_dense.py, deepspeed_moe.py (with _deepspeed_moe_setup.py and
_deepspeed_moe_report.py), moma.py and multitask.py train variants of a model
at a scale (a dataclass of sizes, steps and evaluation points; FULL and a
--quick QUICK each) and compare them. This module holds, once:
  - scales: `train_config(scale, lr, seed, ...)`, the TrainConfig every scale
    maps to (warmup + cosine to 0.1x, `evals` points over the run, no saves);
  - data: `corpora(scale)` (tinyshakespeare when ../shared has it, and the
    Python standard library), `lm_loss_fn`;
  - a variant's run: `train_curve` trains with moekit's `fit` and records the
    validation curve against training tokens and FLOPs (FLOPs per token from
    moekit.train.flops); `load_trained` reads a run back;
  - speed: `throughput` (training tokens/s, interleaved over the variants);
  - results: `reach_target` (the "FLOPs to reach the dense final loss" target,
    with a note when never reached), `plot_curves` (loss-vs-FLOPs panels, one
    PNG), `targets_markdown`, `code_state`/`code_line`, per-run JSON
    (`save_json`, `load_runs`); JSON + md with a `targets` list are written by
    _common.write_results.

Not here: machine info, interleaved timing and result files in general
(_common.py), any benchmark's own models, claims and prose (their scripts).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import interleaved_times, markdown_table, median, target  # noqa: E402

from moekit.checkpoints import load_checkpoint, load_model_state  # noqa: E402
from moekit.config import from_dict, to_dict  # noqa: E402
from moekit.data.text import batch_at  # noqa: E402
from moekit.models.decoder import DecoderLM, ModelConfig, lm_loss  # noqa: E402
from moekit.train.lm import DataConfig  # noqa: E402
from moekit.train.loop import TrainConfig, fit, make_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"


# ---------------------------------------------------------------- scales and data


def train_config(s, lr: float = 3e-3, seed: int = 0, steps: int | None = None, **extra) -> TrainConfig:
    """The TrainConfig of scale `s` (fields steps, batch_size, seq_len, warmup, evals, eval_batches).

    steps: a shorter (or longer) run with its own schedule, evaluated at the scale's step spacing.
    """
    return TrainConfig(steps=steps or s.steps, batch_size=s.batch_size, seq_len=s.seq_len, lr=lr, min_lr_ratio=0.1,
                       warmup_steps=s.warmup, eval_every=max(1, s.steps // s.evals), eval_batches=s.eval_batches,
                       save_every=0, keep_last=1, seed=seed, **extra)


def corpora(s) -> tuple[dict[str, DataConfig], dict[str, str]]:
    """The text corpora of a comparison (byte-level, s.max_bytes each), and those skipped with why."""
    found, skipped = {}, {}
    if SHAKESPEARE.is_file():
        found["tinyshakespeare"] = DataConfig(path=str(SHAKESPEARE), max_bytes=s.max_bytes, tokenizer="byte")
    else:
        skipped["tinyshakespeare"] = f"{SHAKESPEARE} is absent (the shared data folder ../shared is not here)"
        print(f"skipping tinyshakespeare: {skipped['tinyshakespeare']}", flush=True)
    found["python-stdlib"] = DataConfig(path=None, max_bytes=s.max_bytes, tokenizer="byte")
    return found, skipped


def lm_loss_fn(tc: TrainConfig):
    """fit's loss_fn: next-token cross-entropy plus the router losses at the run's weights."""
    def loss_fn(model, batch):
        x, y = batch
        loss, parts = lm_loss(model(x), y, tc.balance_loss_weight, tc.z_loss_weight)
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    return loss_fn


# ---------------------------------------------------------------- one variant's run


def train_curve(model: DecoderLM, tc: TrainConfig, *, train_tokens: torch.Tensor, evaluate: Callable[[DecoderLM], dict],
                flops_per_token: float, run_dir: Path, tokenizer=None, val_key: str = "val_loss",
                loss_fn=None) -> tuple[list[dict], float]:
    """Train `model` with moekit's `fit` on `train_tokens`; returns its curve and the training seconds.

    The curve holds {step, tokens, flops, **evaluate(model)} before training and
    every tc.eval_every steps; `val_key` names the loss fit logs as val_loss.
    """
    tokens_per_step = tc.batch_size * tc.seq_len
    curve = [{"step": 0, "tokens": 0, "flops": 0, **evaluate(model)}]

    def eval_fn(m, step):
        losses = evaluate(m)
        curve.append({"step": step, "tokens": step * tokens_per_step, "flops": step * tokens_per_step * flops_per_token,
                      **losses})
        return {"val_loss": losses[val_key]}

    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    fit(model, tc, batch_fn=lambda i: batch_at(train_tokens, i, tc.batch_size, tc.seq_len, tc.seed),
        loss_fn=loss_fn or lm_loss_fn(tc), run_dir=run_dir,
        config_dict={"model": to_dict(model.cfg), "train": to_dict(tc)}, eval_fn=eval_fn, tokenizer=tokenizer,
        progress=False, tokens_per_batch=tokens_per_step)
    return curve, time.perf_counter() - started


def load_trained(run_dir: Path) -> DecoderLM:
    """The model a `train_curve` run saved (its last checkpoint)."""
    ckpt = load_checkpoint(run_dir)
    model = DecoderLM(from_dict(ModelConfig, ckpt.config["model"], f"{run_dir}/config.json"))
    load_model_state(model, ckpt.model_state)
    return model


def throughput(models: dict[str, DecoderLM], train_tokens: torch.Tensor, tc: TrainConfig, s) -> dict[str, float]:
    """Training tokens/s of each model (forward, loss, backward, clip, AdamW step), timed interleaved, median.

    Copies of the models are timed, so routing is as trained; the step mirrors
    moekit.train.fit's. s.throughput_rounds rounds of s.throughput_steps steps each.
    """
    steps = {}
    for name, trained in models.items():
        model = copy.deepcopy(trained).train()
        optimizer = make_optimizer(model, tc)
        loss_fn = lm_loss_fn(tc)
        counter = iter(range(10**9))

        def step(model=model, optimizer=optimizer, loss_fn=loss_fn, counter=counter):
            for _ in range(s.throughput_steps):
                loss, _ = loss_fn(model, batch_at(train_tokens, next(counter), tc.batch_size, tc.seq_len, tc.seed + 7))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        steps[name] = step
    times = interleaved_times(steps, reps=s.throughput_rounds, warmup=1)
    tokens = s.throughput_steps * tc.batch_size * tc.seq_len
    return {name: tokens / median(t) for name, t in times.items()}


# ---------------------------------------------------------------- results


def reach_target(label: str, ratio: float | None, goal: float, final: float, dense_final: float,
                 budget_ratio: float) -> dict:
    """The target "FLOPs to reach the dense final loss / dense FLOPs <= goal"; never reached: value None, a note."""
    if ratio is not None:
        return target(label, ratio, goal, "<=")
    return {"name": label, "value": None, "goal": goal, "direction": "<=", "met": False,
            "note": f"never reached within the token budget (final val loss {final:.4f} vs dense {dense_final:.4f}), "
                    f"so the ratio is above {budget_ratio:.2f}"}


def targets_markdown(targets: list[dict]) -> str:
    """The targets as a table: name, value (n/a when never reached), goal, met."""
    return markdown_table(["target", "value", "goal", "met"], [
        [t["name"], "n/a" if t["value"] is None else f"{t['value']:.4g}", f"{t['direction']} {t['goal']}",
         "yes" if t["met"] else "**no**"] for t in targets])


def plot_curves(panels: list[dict], path: Path, title: str | None = None, size=(6, 4.5), dpi: int = 110) -> Path:
    """One PNG of loss-vs-FLOPs panels, written atomically.

    A panel: {"title", "series": [(label, xs, ys, plot kwargs)], "hlines": [(y, kwargs)], "vlines": [(x, kwargs)],
    "marks": [(x, y)], "xlabel", "ylabel", "ylim"}; only "series" is required.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(size[0] * len(panels), size[1]), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, xs, ys, kwargs in panel["series"]:
            ax.plot(xs, ys, label=label, **{"marker": ".", **kwargs})
        for x, y in panel.get("marks", ()):
            ax.plot([x], [y], "kx", markersize=9)
        for y, kwargs in panel.get("hlines", ()):
            ax.axhline(y, **{"color": "gray", "linewidth": 1, **kwargs})
        for x, kwargs in panel.get("vlines", ()):
            ax.axvline(x, **{"color": "gray", "linewidth": 1, **kwargs})
        if panel.get("ylim"):
            ax.set_ylim(*panel["ylim"])
        ax.set_xlabel(panel.get("xlabel", "training FLOPs (analytic)"))
        ax.set_ylabel(panel.get("ylabel", "validation loss (nats/byte)"))
        ax.set_title(panel.get("title", ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def code_state() -> dict:
    """The commit measured, and any uncommitted changes to the library (other work may be in flight)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line.split(maxsplit=1)[1] for line in git("status", "--porcelain", "--", "moekit").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown", "uncommitted_moekit_files": dirty}


def code_line(code: dict) -> str:
    dirty = code.get("uncommitted_moekit_files")
    if dirty is None:
        return f"moekit at {code['commit']} (uncommitted changes, if any, not recorded)"
    return f"moekit at {code['commit']}" + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else "")


def save_json(path: Path, data: dict) -> None:
    """One run's record (curve + summary), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def load_runs(folder: Path) -> list[dict]:
    """Every run record saved in `folder` (none when it does not exist)."""
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
