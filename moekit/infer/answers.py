"""Greedy answers of a task-routed model (data.kind=math_tasks) through the engine's decode.

`greedy_answers(model, prompts, task_ids)` is the `answers` function that
training's exact match (moekit.train.multitask.exact_match), `moekit train`,
`moekit inspect` and `moekit refine` use: each prompt's greedy continuation,
decoded by `Engine.generate_ids` with the task id as every token's group id,
up to the first newline (at most max_new bytes). Prompts of equal length are
decoded together (no padding).

Not here: the decode loop (engine.py), the scoring (moekit.train.multitask).
"""

from __future__ import annotations

from ..data.mathtasks import MAX_ANSWER_CHARS, encode_bytes
from ..train.multitask import answer_text
from .engine import Engine
from .sampling import SamplingConfig

NEWLINE = 10  # an answer ends at the first newline byte


def greedy_answers(model, prompts: list[str], task_ids: list[int], max_new: int = MAX_ANSWER_CHARS,
                   batch_size: int = 64) -> list[str]:
    """Each prompt's greedy answer under its task id (see the module docstring); the model's mode is kept."""
    was_training = model.training
    engine = Engine(model, stop_token_ids=[NEWLINE])  # (puts the model in eval mode)
    engine.adapt_threads = False  # the thread count of the caller (a training run's evaluation) stays as it is
    sampling = SamplingConfig(max_new_tokens=max_new + 1, temperature=0.0, stop_token_ids=[NEWLINE])
    encoded = [encode_bytes("\n" + p) for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    answers = [""] * len(prompts)
    try:
        for group in by_len.values():
            for start in range(0, len(group), batch_size):
                rows = group[start: start + batch_size]
                out = engine.generate_ids([encoded[i] for i in rows], sampling, group_ids=[task_ids[i] for i in rows])
                for i, completion in zip(rows, out):
                    answers[i] = answer_text(completion.token_ids, max_new)
    finally:
        model.train(was_training)
    return answers
