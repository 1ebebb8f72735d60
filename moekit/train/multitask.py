"""Multi-task training on the math suite (JiuZhang 2.0): task-size sampling, task ids as group ids, exact match.

`moekit train ... data.kind=math_tasks` lands here (`MathTasksRecipe`, registered
for the kind in recipes.py; train/lm.py runs it): the suite of
moekit.data.mathtasks is generated from the run's config (so a checkpoint can
rebuild it), each batch row holds problems of one task drawn with probability
p_i ~ n_i ** (1 / task_temperature), the row's task id is every token's group id
(what `router=task` and `router=group` route on), and the loss covers the
answers only, each task's tokens weighted by `task_loss_weights`.
`exact_match` scores a model's greedy answers on the test problems; the answers
come from the caller (`answers`: moekit.infer.answers.greedy_answers, the engine's
decode, which lives above training), so there is no decode loop here.

Not here: the problems themselves (moekit.data.mathtasks), the training loop (loop.py),
the text recipe (lm.py), routing statistics by task (moekit.moe.task_stats), decoding (moekit.infer).

Shape legend: B batch rows, T tokens, V vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..config import _check_int, field_list
from ..data.mathtasks import (DEFAULT_TEST_SIZE, DEFAULT_TRAIN_SIZES, MAX_ANSWER_CHARS, TASKS, MathSuite,
                              check_tasks, make_suite, pack_rows, task_probabilities)
from ..errors import ConfigError
from .recipes import Answers, LMData, Recipe, register

TASK_ROUTERS = ("task", "group")  # routers that read the task id of each token


@dataclass
class MathTasksConfig:
    """The math suite of a `data.kind=math_tasks` run and how its tasks are mixed."""

    tasks: list[str] = field_list(list(TASKS))
    train_sizes: list[int] = field_list(list(DEFAULT_TRAIN_SIZES))  # training problems per task
    test_size: int = DEFAULT_TEST_SIZE  # test problems per task (disjoint from training)
    task_temperature: float = 1.0  # p_i ~ n_i ** (1 / T): 1 by size, large T uniform
    task_loss_weights: list[float] = field_list([])  # per task; empty: all 1
    eval_problems: int = 50  # test problems per task scored by exact match at each evaluation
    suite_seed: int = 0

    def __post_init__(self) -> None:
        check_tasks(self.tasks)
        if len(self.train_sizes) != len(self.tasks):
            raise ConfigError(f"train_sizes has {len(self.train_sizes)} entries for {len(self.tasks)} tasks: give one per task")
        if self.task_loss_weights and (len(self.task_loss_weights) != len(self.tasks) or min(self.task_loss_weights) < 0
                                       or sum(self.task_loss_weights) <= 0):
            raise ConfigError(f"task_loss_weights={self.task_loss_weights} is invalid: give one weight >= 0 per task "
                              f"({len(self.tasks)}), not all zero, or none")
        task_probabilities(self.train_sizes, self.task_temperature)
        for name in ("test_size", "eval_problems"):
            _check_int(self, name, 1)
        _check_int(self, "suite_seed", 0)

    def weights(self) -> list[float]:
        return list(self.task_loss_weights) or [1.0] * len(self.tasks)


def with_task_groups(model_cfg, tasks: list[str]):
    """The model config with moe.num_groups = the number of tasks when its router reads task ids."""
    if model_cfg.ffn == "dense" or model_cfg.moe.router not in TASK_ROUTERS:
        return model_cfg
    return replace(model_cfg, moe=replace(model_cfg.moe, num_groups=len(tasks)))


def task_id(tasks: list[str], name: str) -> int:
    """The id of task `name` in a model trained on `tasks`, or one clear error."""
    if name not in tasks:
        raise ConfigError(f"task {name!r} is not one this model was trained on: it knows {', '.join(tasks)}")
    return list(tasks).index(name)


def build_suite(mc: MathTasksConfig) -> MathSuite:
    return make_suite(mc.tasks, mc.train_sizes, mc.test_size, mc.suite_seed)


# ---------------------------------------------------------------- batches and loss


def _generator(seed: int, step: int) -> torch.Generator:
    digest = hashlib.sha256(json.dumps(["math_tasks", seed, step]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def task_batch(suite: MathSuite, split: str, step: int, batch_size: int, seq_len: int, seed: int,
               probs: list[float] | None = None):
    """(x_BT, y_BT, task_BT) for one step: each row one task (drawn by `probs`), problems drawn uniformly.

    Depends only on (seed, step), so a resumed run sees the same batches.
    """
    problems = getattr(suite, split)
    gen = _generator(seed, step)
    probs = probs or [1.0 / len(suite.tasks)] * len(suite.tasks)
    row_tasks = torch.multinomial(torch.tensor(probs), batch_size, replacement=True, generator=gen).tolist()
    xs, ys = [], []
    for t in row_tasks:
        pool = problems[suite.tasks[t]]
        shortest = min(len(p.text) for p in pool[:64])
        picks = torch.randint(0, len(pool), (seq_len // max(shortest - 1, 1) + 2,), generator=gen).tolist()
        x, y = pack_rows(pool, [picks], seq_len)
        xs.append(x)
        ys.append(y)
    task_B = torch.tensor(row_tasks)
    return torch.cat(xs), torch.cat(ys), task_B[:, None].expand(batch_size, seq_len).contiguous()


def task_loss(out, y_BT: torch.Tensor, task_BT: torch.Tensor, weights_G: torch.Tensor, balance_weight: float,
              z_weight: float):
    """Answer-token cross-entropy weighted per task, plus the router losses; returns (loss, parts)."""
    ce_BT = F.cross_entropy(out.logits.float().flatten(0, 1), y_BT.flatten(), ignore_index=-100,
                            reduction="none").view_as(y_BT)
    w_BT = weights_G.to(ce_BT.device)[task_BT] * (y_BT != -100)
    ce = (ce_BT * w_BT).sum() / w_BT.sum().clamp_min(1e-9)
    loss, parts = ce, {"ce": ce}
    for name, weight in (("balance", balance_weight), ("z", z_weight)):
        if name in out.aux_losses:
            parts[name] = out.aux_losses[name]
            loss = loss + weight * parts[name]
    return loss, parts


def forward_tasks(model, x_BT: torch.Tensor, task_BT: torch.Tensor):
    """The model's forward with the task ids as group ids (ignored by routers that do not read them)."""
    return model(x_BT, group_ids_BT=task_BT)


# ---------------------------------------------------------------- exact match


def answer_text(token_ids: list[int], max_new: int = MAX_ANSWER_CHARS) -> str:
    """The answer in generated byte tokens: up to the first newline, at most max_new bytes."""
    ids = [t for t in token_ids if t < 256]
    ids = ids[: ids.index(10)] if 10 in ids else ids
    return bytes(ids[:max_new]).decode("utf-8", "replace")


def exact_match(model, suite: MathSuite, answers: Answers, limit: int | None = None, split: str = "test") -> dict[str, float]:
    """Per-task exact-match accuracy (fraction) of `answers` (greedy, e.g. moekit.infer.answers), and their mean."""
    result = {}
    for t, task in enumerate(suite.tasks):
        problems = getattr(suite, split)[task][:limit]
        got = answers(model, [p.prompt for p in problems], [t] * len(problems))
        result[task] = sum(a == p.answer for a, p in zip(got, problems)) / len(problems)
    result["mean"] = sum(result[t] for t in suite.tasks) / len(suite.tasks)
    return result


# ---------------------------------------------------------------- the recipe


@register("math_tasks")
class MathTasksRecipe(Recipe):
    """The math suite, generated from the config; task ids as group ids; exact match when given `answers`."""

    def prepare(self, data_cfg, seq_len, tokenizer=None) -> LMData:
        from ..data.text import Tokenizer

        source = f"math_tasks:{','.join(data_cfg.math.tasks)}"
        return LMData(tokenizer or Tokenizer.byte_level(), None, None, source, suite=build_suite(data_cfg.math))

    def model_config(self, model_cfg, data_cfg):
        return with_task_groups(model_cfg, data_cfg.math.tasks)

    def step_fns(self, cfg, data, parallel, out, answers=None):
        return math_task_fns(cfg, data.suite, parallel, answers)

    def inspect(self, model, tokenizer, cfg, ckpt_dir, heatmap, batches, answers=None) -> dict:
        return inspect_tasks(model, cfg, ckpt_dir, heatmap, batches, answers)


def math_task_fns(cfg, suite: MathSuite, parallel=None, answers: Answers | None = None):
    """(batch_fn, loss_fn, eval_fn) for fit: what `moekit train data.kind=math_tasks` trains and reports.

    eval_fn adds exact match (em_<task>, em_mean) when `answers` is given.
    """
    if parallel is not None and parallel.sharded:
        raise ConfigError("data.kind=math_tasks does not support --expert-parallel yet: train it on one process")
    tc, mc = cfg.train, cfg.data.math
    longest = max((len(p.text), t) for t in suite.tasks for p in suite.train[t] + suite.test[t])
    if tc.seq_len < longest[0]:
        raise ConfigError(f"train.seq_len={tc.seq_len} is shorter than the longest {longest[1]} problem ({longest[0]} "
                          f"bytes): raise it to at least {longest[0]} so every row holds a whole problem")
    probs = task_probabilities(mc.train_sizes, mc.task_temperature)
    weights_G = torch.tensor(mc.weights())

    def batch_fn(i):
        return task_batch(suite, "train", i, tc.batch_size, tc.seq_len, tc.seed, probs)

    def loss_fn(m, batch):
        x, y, g = batch
        loss, parts = task_loss(forward_tasks(m, x, g), y, g, weights_G, tc.balance_loss_weight, tc.z_loss_weight)
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    def eval_fn(m, step):
        em = exact_match(m, suite, answers, mc.eval_problems) if answers is not None else {}
        return {"val_loss": task_val_loss(m, suite, tc), **{f"em_{k}": v for k, v in em.items()}}

    return batch_fn, loss_fn, eval_fn


@torch.no_grad()
def task_val_loss(model, suite: MathSuite, tc, batches: int | None = None) -> float:
    """Answer-token cross-entropy on test rows, every task equally often."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(batches or tc.eval_batches):
        x, y, g = task_batch(suite, "test", i, tc.batch_size, tc.seq_len, tc.seed + 1_000_003)
        out = forward_tasks(model, x, g)
        total += float(F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"))
        count += int((y != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------- moekit inspect for a model with tasks


@torch.no_grad()
def inspect_tasks(model, cfg, ckpt_dir, heatmap=None, batches: int = 4, answers: Answers | None = None) -> dict:
    """Expert load, the task x expert heatmap and per-task routing entropy on test rows; exact match given `answers`."""
    from pathlib import Path

    from ..moe.stats import LoadTracker
    from ..moe.task_stats import TaskLoadTracker

    suite, tc = build_suite(cfg.data.math), cfg.train
    model.eval()
    tracker, by_task = LoadTracker(), TaskLoadTracker(suite.tasks)
    for i in range(batches):
        x, y, g = task_batch(suite, "test", i, tc.batch_size, min(tc.seq_len, model.cfg.max_seq_len), tc.seed + 1_000_003)
        out = forward_tasks(model, x, g)
        tracker.add(out.routings)
        by_task.add(out.routings, g)
    load_png = Path(heatmap) if heatmap else Path(ckpt_dir) / "expert_load.png"
    plots = {}
    if tracker.counts:
        plots["heatmap"] = tracker.plot(load_png, f"expert load, {Path(ckpt_dir).name}")
        plots["task_heatmap"] = by_task.plot(load_png.with_name(load_png.stem + "_by_task.png"),
                                             f"routing by task, {Path(ckpt_dir).name}")
    em = {"exact_match": exact_match(model, suite, answers, cfg.data.math.eval_problems)} if answers is not None else {}
    return {"val_loss": task_val_loss(model, suite, tc, batches), "layers": tracker.summary_rows(), "summary": tracker.summary(),
            "heatmap": plots.get("heatmap"), "task_heatmap": plots.get("task_heatmap"),
            "task_summary": by_task.summary() if by_task.counts else None, "task_entropy": by_task.entropy_bits(),
            **em, "checkpoint": Path(ckpt_dir)}


__all__ = ["MathTasksConfig", "MathTasksRecipe", "task_batch", "task_loss", "answer_text", "exact_match",
           "math_task_fns", "task_id", "with_task_groups", "inspect_tasks"]
