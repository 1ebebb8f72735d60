"""The generated math suite: every answer re-derived from the problem's text with Python's own arithmetic."""

import re
from fractions import Fraction

import pytest

from moekit.data.mathtasks import TASKS, make_suite, pack_rows, task_probabilities
from moekit.errors import ConfigError

# Unit factors written out again here (not imported) so a wrong table in the generator would be caught.
FACTORS = {("km", "m"): 1000, ("m", "cm"): 100, ("cm", "mm"): 10, ("kg", "g"): 1000, ("l", "ml"): 1000,
           ("h", "min"): 60, ("min", "s"): 60, ("day", "h"): 24, ("week", "day"): 7, ("ft", "in"): 12,
           ("yd", "ft"): 3, ("dozen", "unit"): 12}

# Word-problem phrases -> how the numbers in the text (in order) give the answer.
WORD_RULES = (
    ("buys {} more and gives {} away", lambda a, b, c: a + b - c),
    ("boxes of", lambda a, b, c: a * b - c),
    ("shared equally by", lambda total, kids, shares: Fraction(total, kids) * shares),
    ("coins a day for", lambda a, days, spent: a * days - spent),
    ("more than that on day two", lambda a, b: a + (a + b)),
)


def solve(task, prompt):
    if task == "arithmetic":
        assert re.fullmatch(r"\d+[+\-*]\d+=", prompt), prompt
        return str(eval(prompt[:-1]))  # Python parses and computes the expression itself
    if task == "linear_equations":
        m = re.fullmatch(r"(-?\d*)x([+-]\d+)=(-?\d+); x=", prompt)
        a = {"": 1, "-": -1}.get(m[1], None) or int(m[1])
        x = Fraction(int(m[3]) - int(m[2]), a)
        assert x.denominator == 1 and a * x + int(m[2]) == int(m[3])
        return str(x.numerator)
    if task == "unit_conversion":
        m = re.fullmatch(r"(\d+) (\w+) in (\w+)=", prompt)
        v, src, dst = int(m[1]), m[2], m[3]
        value = v * FACTORS[(src, dst)] if (src, dst) in FACTORS else Fraction(v, FACTORS[(dst, src)])
        assert Fraction(value).denominator == 1
        return str(int(value))
    if task == "comparison":
        m = re.fullmatch(r"larger of (\d+\.\d+) and (\d+\.\d+)=", prompt)
        return m[1] if Fraction(m[1]) > Fraction(m[2]) else m[2]
    numbers = [int(n) for n in re.findall(r"\d+", prompt)]
    rules = [rule for phrase, rule in WORD_RULES if all(part.strip() in prompt for part in phrase.split("{}"))]
    assert len(rules) == 1, prompt
    value = Fraction(rules[0](*numbers))
    assert value.denominator == 1 and value >= 0
    return str(value.numerator)


@pytest.fixture(scope="module")
def suite():
    return make_suite(train_sizes=1500, test_size=300, seed=3)


def test_every_answer_is_correct(suite):
    checked = 0
    for task in TASKS:
        for p in suite.train[task] + suite.test[task]:
            assert solve(task, p.prompt) == p.answer, (task, p.prompt, p.answer)
            checked += 1
    assert checked == 5 * 1800


def test_splits_are_disjoint_seeded_and_sized(suite):
    for task in TASKS:
        train, test = {p.prompt for p in suite.train[task]}, {p.prompt for p in suite.test[task]}
        assert len(train) == 1500 and len(test) == 300 and not train & test
    again = make_suite(train_sizes=1500, test_size=300, seed=3)
    assert again.test == suite.test and again.train == suite.train
    other = make_suite(train_sizes=1500, test_size=300, seed=4)
    assert other.test["arithmetic"] != suite.test["arithmetic"]


def test_every_task_is_varied(suite):
    ops = {re.search(r"[+\-*]", p.prompt)[0] for p in suite.train["arithmetic"]}
    assert ops == {"+", "-", "*"}
    kinds = {phrase for p in suite.train["word_problems"] for phrase, _ in WORD_RULES
             if all(part.strip() in p.prompt for part in phrase.split("{}"))}
    assert len(kinds) == len(WORD_RULES)
    assert any(p.answer.startswith("-") for p in suite.train["linear_equations"])


def test_task_probabilities_follow_the_temperature():
    sizes = [400, 100]
    assert task_probabilities(sizes, 1.0) == pytest.approx([0.8, 0.2])
    assert task_probabilities(sizes, 2.0) == pytest.approx([20 / 30, 10 / 30])  # sqrt: 20 vs 10
    assert task_probabilities(sizes, 1e9) == pytest.approx([0.5, 0.5], abs=1e-6)
    with pytest.raises(ConfigError, match="task_temperature"):
        task_probabilities(sizes, 0.0)


def test_pack_rows_keeps_loss_on_answers_only(suite):
    problems = suite.train["arithmetic"][:20]
    x, y = pack_rows(problems, [list(range(10)), list(range(10, 20))], seq_len=48)
    assert x.shape == y.shape == (2, 48)
    row = bytes(x[0].tolist()).decode()
    assert row.startswith("\n" + problems[0].prompt + problems[0].answer + "\n\n" + problems[1].prompt)
    kept = "".join(chr(int(t)) for t in y[0] if t >= 0)
    assert kept.startswith(problems[0].answer + "\n" + problems[1].answer + "\n")
    assert (y[0, : len(problems[0].prompt)] == -100).all()


def test_bad_task_names_and_sizes_are_refused():
    with pytest.raises(ConfigError, match="algebra"):
        make_suite(tasks=["algebra"])
    with pytest.raises(ConfigError, match="one positive integer per task"):
        make_suite(tasks=["arithmetic", "comparison"], train_sizes=[10])
