"""Mixture-of-Students: the KD loss by hand, the KD stop step, bitwise resume after SIGKILL, bad input named."""

import json
import math
import signal
from pathlib import Path

import pytest
import torch

from moekit.train.distill import DistillConfig, distill_lm, kd_loss, kd_steps
from moekit.train.lm import load_lm, resolve_run_config, train_lm
from test_train import MICRO, cli_error, losses, run_cli, wait_for

STUDENT = MICRO + ["model.num_layers=1", "train.eval_every=0", "train.device=cpu"]  # bitwise: CPU even where CUDA is


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    lines = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(600)]
    path = tmp_path_factory.mktemp("data") / "code.txt"
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, text_file):
    run = tmp_path_factory.mktemp("teacher") / "run"
    train_lm(resolve_run_config("tiny", None, MICRO + ["train.steps=6", "train.eval_every=0", "train.device=cpu"], str(text_file)), run,
             progress=False)
    return run


def test_kd_loss_equals_a_hand_computation():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
    T = 2.0

    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    kl = [sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(softmax(t), softmax(s)))
          for s, t in zip(student, teacher)]
    expected = T * T * sum(kl) / len(kl)  # KL summed over the vocabulary, mean over the 2 tokens
    got = kd_loss(torch.tensor([student]), torch.tensor([teacher]), T)  # [B=1, T=2, V=3]
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(kd_loss(torch.tensor(student), torch.tensor(student), T)) == pytest.approx(0.0, abs=1e-7)


def test_kd_steps_is_the_floor_of_the_fraction():
    assert [kd_steps(f, 10) for f in (0.0, 0.25, 0.5, 1.0)] == [0, 2, 5, 10]
    assert kd_steps(0.29, 100) == 29 and kd_steps(0.7, 10) == 7  # float products just below an integer


def test_kd_is_switched_off_after_the_given_fraction_of_steps(tmp_path, teacher, text_file):
    cfg = resolve_run_config("tiny", None, STUDENT + ["train.steps=8"], str(text_file))
    kd = DistillConfig(kd_weight=0.5, kd_temperature=2.0, kd_stop=0.375)  # 3 of 8 steps
    summary = distill_lm(teacher, cfg, tmp_path / "s", kd, progress=False)
    rows = [r for l in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines() if "loss" in (r := json.loads(l))]
    assert [r["kd_on"] for r in rows] == [1.0] * 3 + [0.0] * 5
    tc = cfg.train
    for r in rows:  # the logged loss is the LM loss plus weight * KD while KD is on, the LM loss alone after
        lm = r["ce"] + tc.balance_loss_weight * r.get("balance", 0.0) + tc.z_loss_weight * r.get("z", 0.0)
        assert r["loss"] == pytest.approx(lm + 0.5 * r.get("kd", 0.0), rel=1e-5)
        assert ("kd" in r) == bool(r["kd_on"]) and r.get("kd", 1.0) > 0
    saved = json.loads((summary["result"].checkpoint / "config.json").read_text())
    assert saved["distill"] == {"teacher": str((teacher / "step-00000006").resolve()), "kd_weight": 0.5,
                                "kd_temperature": 2.0, "kd_stop": 0.375}
    model, _, student_cfg = load_lm(tmp_path / "s")  # an ordinary LM checkpoint
    assert student_cfg.model.num_layers == 1 and len(model.layers) == 1


def test_distillation_resumes_bitwise_after_sigkill(tmp_path, teacher, text_file):
    args = ["distill", str(teacher), *STUDENT, "train.steps=30", "train.save_every=5",
            "--student", "tiny", "--data", str(text_file), "--quiet", "--kd-stop", "0.5"]
    full = run_cli([*args, "--out", str(tmp_path / "full")])
    killed = run_cli([*args, "--out", str(tmp_path / "killed")])
    wait_for(tmp_path / "killed" / "step-00000010", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert full.wait(timeout=300) == 0, full.communicate()[1]
    assert len(losses(tmp_path / "killed")) < 30  # it really was cut short
    resumed = run_cli(["distill", "--out", str(tmp_path / "killed"), "--resume", "--quiet"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")
    assert "KD for the first 15 steps" in out


def _not_a_checkpoint(tmp_path: Path) -> Path:
    d = tmp_path / "notes"
    d.mkdir()
    (d / "readme.txt").write_text("not a checkpoint")
    return d


@pytest.mark.parametrize("case", ["vocab", "not_lm", "missing", "kd_stop_high", "kd_stop_low"])
def test_bad_distillation_input_gets_one_clear_message_and_writes_nothing(tmp_path, capsys, teacher, text_file, case):
    teacher_arg, extra, overrides, message = str(teacher), [], [], ""
    if case == "vocab":
        overrides, message = ["data.tokenizer=bpe", "data.bpe_vocab_size=300"], "the student's vocabulary (bpe tokenizer, 300 tokens) differs from the teacher's (byte tokenizer, 257 tokens)"
    elif case == "not_lm":
        teacher_arg, message = str(_not_a_checkpoint(tmp_path)), "is not a moekit language-model checkpoint"
    elif case == "missing":
        teacher_arg, message = str(tmp_path / "nowhere"), "does not exist"
    elif case == "kd_stop_high":
        extra, message = ["--kd-stop", "1.5"], "--kd-stop=1.5 is invalid: it must be a fraction of the steps in [0, 1]"
    else:
        extra, message = ["--kd-stop", "-0.1"], "--kd-stop=-0.1 is invalid"
    err = cli_error(capsys, ["distill", teacher_arg, *STUDENT, "train.steps=2", *overrides, "--student", "tiny",
                             "--data", str(text_file), "--out", str(tmp_path / "out"), *extra])
    assert message in err and len(err.splitlines()) == 1
    assert "teacher" in err or "kd-stop" in err or "vocabulary" in err
    assert not (tmp_path / "out").exists()


def test_resume_of_a_training_run_or_with_new_kd_settings_is_refused(tmp_path, capsys, teacher):
    before = sorted(p.name for p in teacher.iterdir())
    err = cli_error(capsys, ["distill", "--out", str(teacher), "--resume", "train.steps=99"])
    assert "is a training run, not a distillation: resume it with moekit train --resume" in err
    err = cli_error(capsys, ["distill", "--out", str(teacher), "--resume", "--kd-stop", "0.2"])
    assert "--kd-stop cannot be combined with --resume" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in teacher.iterdir()) == before


def test_too_small_corpus_is_refused_before_the_run_folder_exists(tmp_path, capsys, teacher):
    small = tmp_path / "small.txt"
    small.write_text("def f():\n    pass\n")
    err = cli_error(capsys, ["distill", str(teacher), *STUDENT, "--student", "tiny", "--data", str(small),
                             "--out", str(tmp_path / "out")])
    assert len(err.splitlines()) == 1 and f"the corpus {small} is too small" in err, err
    assert not (tmp_path / "out").exists()
