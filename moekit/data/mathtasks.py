"""A generated multi-task math suite with exact answers (JiuZhang 2.0's setting at small scale).

Five tasks, each a seeded generator of (prompt, answer) text problems:

- `arithmetic`: two- and three-digit addition and subtraction, two-digit times one-digit ("147+89=" -> "236");
- `word_problems`: two-step problems from templates ("Ann has 12 pens. She buys 5 more and gives 3 away. ...");
- `linear_equations`: a*x + b = c with an integer solution ("3x+5=20; x=" -> "5");
- `unit_conversion`: whole-number conversions between common units ("3 km in m=" -> "3000");
- `comparison`: the larger of two decimals ("larger of 4.17 and 4.2=" -> "4.2").

`make_suite` returns disjoint train/test problems per task (no prompt appears in both), and
`pack_rows` turns one task's problems into byte-level training rows whose loss covers the
answers only. Every prompt ends with "=" and every example is "\\n" + prompt + answer + "\\n", so a
greedy decode after "\\n" + prompt is scored by exact match up to the next newline.

Not here: training, decoding or scoring with a model (moekit.train.multitask), any download.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

TASKS = ("arithmetic", "word_problems", "linear_equations", "unit_conversion", "comparison")
DEFAULT_TRAIN_SIZES = (6000, 4000, 3000, 1500, 2000)  # unequal on purpose: task-size temperature matters
DEFAULT_TEST_SIZE = 200
MAX_ANSWER_CHARS = 8

NAMES = ("Ann", "Ben", "Cai", "Dora", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun")
ITEMS = ("apples", "pens", "cards", "books", "coins", "shells", "stamps", "marbles")
# (from, to, factor): `from` units are `factor` `to` units.
UNITS = (("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("kg", "g", 1000), ("l", "ml", 1000),
         ("h", "min", 60), ("min", "s", 60), ("day", "h", 24), ("week", "day", 7), ("ft", "in", 12),
         ("yd", "ft", 3), ("dozen", "unit", 12))


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str  # ends with "="
    answer: str

    @property
    def text(self) -> str:
        """The training form: a newline, the prompt, the answer, a newline."""
        return f"\n{self.prompt}{self.answer}\n"


@dataclass
class MathSuite:
    tasks: tuple[str, ...]
    train: dict[str, list[Problem]] = field(default_factory=dict)
    test: dict[str, list[Problem]] = field(default_factory=dict)


# ---------------------------------------------------------------- generators, one per task


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        return f"{a}*{b}=", str(a * b)
    a, b = rng.randint(10, 199), rng.randint(10, 99)
    return (f"{a}+{b}=", str(a + b)) if op == "+" else (f"{a}-{b}=", str(a - b))


def _word_problem(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randint(5, 30), rng.randint(2, 20)
        c = rng.randint(1, a + b)
        return f"{name} has {a} {item}, buys {b} more and gives {c} away. {item} left=", str(a + b - c)
    if kind == 1:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        c = rng.randint(1, a * b)
        return f"{name} buys {a} boxes of {b} {item} and loses {c}. {item} left=", str(a * b - c)
    if kind == 2:
        b, k, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 9)
        c = min(c, b)
        return f"{b * k} {item} are shared equally by {b} kids; {name} takes {c} shares. {item} taken=", str(k * c)
    if kind == 3:
        a, b = rng.randint(2, 20), rng.randint(2, 9)
        c = rng.randint(0, a * b)
        return f"{name} earns {a} coins a day for {b} days and spends {c}. coins kept=", str(a * b - c)
    a, b = rng.randint(2, 40), rng.randint(1, 20)
    return f"{name} reads {a} pages on day one and {b} more than that on day two. pages read=", str(2 * a + b)


def _linear_equation(rng: random.Random) -> tuple[str, str]:
    a = rng.choice([v for v in range(-9, 10) if v not in (0,)])
    x, b = rng.randint(-12, 12), rng.randint(-30, 30)
    c = a * x + b
    coef = {1: "", -1: "-"}.get(a, str(a))
    return f"{coef}x{b:+d}={c}; x=", str(x)


def _unit_conversion(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(UNITS)
    if rng.random() < 0.5:
        v = rng.randint(1, 99)
        return f"{v} {big} in {small}=", str(v * factor)
    v = rng.randint(1, 99)
    return f"{v * factor} {small} in {big}=", str(v)


def _decimal(rng: random.Random, whole: int) -> str:
    digits = rng.choice((1, 2))
    frac = rng.randint(1, 10**digits - 1)
    if digits == 2 and frac % 10 == 0:
        frac //= 10
        digits = 1
    return f"{whole}.{frac:0{digits}d}"


def _comparison(rng: random.Random) -> tuple[str, str]:
    whole = rng.randint(0, 99)
    other = whole if rng.random() < 0.7 else rng.randint(0, 99)  # mostly the same whole part: the hard case
    a, b = _decimal(rng, whole), _decimal(rng, other)
    while float(a) == float(b):
        b = _decimal(rng, other)
    return f"larger of {a} and {b}=", max(a, b, key=float)


GENERATORS = {"arithmetic": _arithmetic, "word_problems": _word_problem, "linear_equations": _linear_equation,
              "unit_conversion": _unit_conversion, "comparison": _comparison}


# ---------------------------------------------------------------- the suite


def check_tasks(tasks) -> tuple[str, ...]:
    """The task names, checked against TASKS (order kept: a task's id is its index here)."""
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ConfigError(f"tasks={list(tasks)} is invalid: give distinct names from {', '.join(TASKS)}")
    return tasks


def make_suite(tasks=TASKS, train_sizes=DEFAULT_TRAIN_SIZES, test_size: int = DEFAULT_TEST_SIZE, seed: int = 0) -> MathSuite:
    """Disjoint train/test problems per task; the same arguments always give the same suite.

    `train_sizes`: one count per task (or one int for all). A task's problems are
    distinct prompts; the test set is drawn first, then training problems that are not in it.
    """
    tasks = check_tasks(tasks)
    sizes = [train_sizes] * len(tasks) if isinstance(train_sizes, int) else list(train_sizes)
    if len(sizes) != len(tasks) or any(not isinstance(n, int) or n < 1 for n in sizes):
        raise ConfigError(f"train sizes {sizes} are invalid: give one positive integer per task ({len(tasks)} tasks)")
    if not isinstance(test_size, int) or test_size < 1:
        raise ConfigError(f"test_size={test_size!r} is invalid: it must be a positive integer")
    suite = MathSuite(tasks)
    for task, n_train in zip(tasks, sizes):
        rng = random.Random(f"{seed}:{task}")
        problems = _distinct(task, rng, test_size + n_train)
        suite.test[task], suite.train[task] = problems[:test_size], problems[test_size:]
    return suite


def _distinct(task: str, rng: random.Random, n: int) -> list[Problem]:
    gen, seen, out = GENERATORS[task], set(), []
    tries = 0
    while len(out) < n:
        prompt, answer = gen(rng)
        tries += 1
        if prompt not in seen:
            seen.add(prompt)
            out.append(Problem(task, prompt, answer))
        elif tries > 50 * n:
            raise ConfigError(f"task {task} has fewer than {n} distinct problems: ask for fewer")
    return out


def task_probabilities(sizes, temperature: float) -> list[float]:
    """Multi-task sampling: p_i proportional to n_i ** (1 / T) (T=1: by size; large T: uniform)."""
    if not temperature > 0:
        raise ConfigError(f"task_temperature={temperature} is invalid: it must be > 0")
    w = [float(n) ** (1.0 / temperature) for n in sizes]
    return [x / sum(w) for x in w]


def encode_bytes(text: str) -> list[int]:
    """Byte-level token ids (moekit's byte tokenizer: id == byte value)."""
    return list(text.encode("utf-8"))


def pack_rows(problems: list[Problem], picks: list[list[int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_BT, y_BT) rows of whole problems back to back; targets outside the answers are -100.

    Row b holds problems[picks[b][0]], problems[picks[b][1]], ... until seq_len + 1 bytes.
    """
    x_rows, y_rows = [], []
    for row in picks:
        ids, keep = [], []
        for i in row:
            p = problems[i]
            head, tail = encode_bytes("\n" + p.prompt), encode_bytes(p.answer + "\n")
            ids += head + tail
            keep += [False] * len(head) + [True] * len(tail)
            if len(ids) > seq_len:
                break
        if len(ids) <= seq_len:
            raise ConfigError(f"seq_len={seq_len} is too long for the problems picked for one row; pick more per row")
        ids, keep = torch.tensor(ids[: seq_len + 1]), torch.tensor(keep[: seq_len + 1])
        x_rows.append(ids[:-1])
        y_rows.append(ids[1:].masked_fill(~keep[1:], -100))
    return torch.stack(x_rows), torch.stack(y_rows)
