"""Training recipes registered by `data.kind`: what `moekit train` does for each kind of data.

A recipe (a `Recipe` subclass, registered with `@register(kind)`) says how a
run of its kind gets its data (`prepare`), what it fixes in the model config
(`model_config`), the `(batch_fn, loss_fn, eval_fn)` that `fit` trains with
(`step_fns`), what `moekit inspect` reports (`inspect`), and whether
`moekit train` prints a text sample after training (`sample`). `recipe_for(kind)`
finds one, or raises one ConfigError naming the kinds accepted.

Registered: text and mixed_modal (lm.py), math_tasks (multitask.py), and
time_series (here: a wrapper around forecaster.py's `train_forecaster`, the
recipe of `moekit train-forecaster`, whose data are CSVs rather than a
RunConfig). The built-in recipes register when moekit.train.lm is imported
(every caller of `train_lm` or `RunConfig` has).

Greedy answers (a math_tasks run's exact match) come from the caller as
`answers(model, prompts, task_ids) -> list[str]` (moekit.infer.answers): the
engine's decode lives in a higher layer than training.

Not here: the training loop (loop.py), the recipes themselves (their modules).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError

Answers = Callable[[Any, list[str], list[int]], list[str]]  # (model, prompts, task ids) -> greedy answers


@dataclass
class LMData:
    """What a language-model recipe trains on: token streams (or a task suite) and their tokenizer."""

    tokenizer: Any  # moekit.data.text.Tokenizer
    train: torch.Tensor | None  # None: rows are generated (math_tasks)
    val: torch.Tensor | None
    source: str
    model_overrides: dict = field(default_factory=dict)  # what the data fixes in the model (modality id ranges)
    files: dict = field(default_factory=dict)  # name -> object with .save(path), written into the run directory
    suite: object = None  # data.kind=math_tasks: the MathSuite (train and val are then None)


class Recipe:
    """One `data.kind`: its data, model settings, training hooks and inspection (see the module docstring)."""

    kind = ""
    command = "train"  # the moekit command that trains this kind
    sample = False  # moekit train prints a sampled continuation after training

    def prepare(self, data_cfg, seq_len: int, tokenizer=None) -> LMData:
        raise NotImplementedError

    def model_config(self, model_cfg, data_cfg):
        """The model config with what this kind of data fixes in it (default: unchanged)."""
        return model_cfg

    def step_fns(self, cfg, data: LMData, parallel, out, answers: Answers | None) -> tuple[Callable, Callable, Callable]:
        raise NotImplementedError

    def inspect(self, model, tokenizer, cfg, ckpt_dir, heatmap, batches: int, answers: Answers | None) -> dict:
        raise NotImplementedError


_RECIPES: dict[str, Recipe] = {}


def register(kind: str):
    """Class decorator: register one instance of the Recipe subclass for `data.kind=kind`."""

    def add(cls: type[Recipe]) -> type[Recipe]:
        if kind in _RECIPES:
            raise ValueError(f"a recipe for data.kind={kind!r} is already registered ({type(_RECIPES[kind]).__name__})")
        cls.kind = kind
        _RECIPES[kind] = cls()
        return cls

    return add


def kinds(command: str = "train") -> list[str]:
    """The data kinds `command` trains, in registration order."""
    return [k for k, r in _RECIPES.items() if r.command == command]


def recipe_for(kind: str, command: str = "train") -> Recipe:
    """The recipe registered for `data.kind=kind` that `command` runs, or one ConfigError naming the accepted kinds."""
    recipe = _RECIPES.get(kind)
    if recipe is not None and recipe.command == command:
        return recipe
    where = f" ({kind} is trained by `moekit {recipe.command}`)" if recipe is not None else ""
    raise ConfigError(f"data.kind={kind!r} is unknown to `moekit {command}`{where}: accepted kinds are "
                      f"{', '.join(kinds(command))}")


@register("time_series")
class ForecasterRecipe(Recipe):
    """Time-MoE forecasters: `moekit train-forecaster` on CSVs (moekit.train.forecaster.train_forecaster)."""

    command = "train-forecaster"

    def train(self, csvs, out, **options) -> dict:
        from .forecaster import train_forecaster

        return train_forecaster(csvs, out, **options)
