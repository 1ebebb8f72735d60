"""Training: a tiny run learns and writes what it promises; resume is exact; Ctrl-C saves; bad input is named."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moekit.cli.main import main
from moekit.train.lm import resolve_run_config, train_lm

MICRO = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
    "model.dense_hidden=64", "moe.num_experts=4", "moe.top_k=2", "moe.expert_hidden=32",
    "train.batch_size=4", "train.seq_len=32", "train.eval_batches=1", "train.warmup_steps=2",
    "train.device=cpu",  # the bitwise resume and oracle comparisons: CPU even where CUDA is (the default is auto)
]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    lines = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(600)]
    path = tmp_path_factory.mktemp("data") / "code.txt"
    path.write_text("".join(lines))
    return path


def losses(run: Path) -> list[float]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_tiny_run_learns_and_writes_a_complete_checkpoint(tmp_path, text_file):
    cfg = resolve_run_config("tiny", None, MICRO + ["train.steps=30", "train.eval_every=15", "train.save_every=15"], str(text_file))
    summary = train_lm(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    loss = losses(run)
    assert len(loss) == 30
    assert sum(loss[-5:]) / 5 < 0.8 * sum(loss[:3]) / 3
    ckpt = summary["result"].checkpoint
    assert ckpt.name == "step-00000030"
    for name in ("config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json", "tokenizer.json"):
        assert (ckpt / name).is_file(), name
    assert (run / "latest").read_text().strip() == "step-00000030"
    assert (run / "expert_load.png").stat().st_size > 1000
    evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    assert [e["step"] for e in evals] == [15, 30]
    assert not list(ckpt.glob("*.pt")) and not list(ckpt.glob("*.bin"))


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    from moekit.models.decoder import DecoderLM, ModelConfig, lm_loss
    from moekit.train.loop import TrainConfig, fit

    torch.manual_seed(0)
    data = torch.randint(0, 50, (8, 17))
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, ffn="dense", dense_hidden=64)

    def loss_fn(m, batch):
        return lm_loss(m(batch[:, :-1]), batch[:, 1:], 0.0, 0.0)[0], {}

    models = []
    for accum, batch_fn in ((1, lambda i: data), (2, lambda i: data[4 * (i % 2) : 4 * (i % 2) + 4])):
        torch.manual_seed(0)
        model = DecoderLM(cfg)
        tc = TrainConfig(steps=1, grad_accum=accum, warmup_steps=0, grad_clip=0.0, eval_every=0, device="cpu")
        fit(model, tc, batch_fn=batch_fn, loss_fn=loss_fn, run_dir=tmp_path / f"a{accum}", config_dict={}, progress=False)
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # Adam amplifies summation-order noise


def run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "moekit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def test_resume_after_sigkill_reproduces_every_step_loss_bitwise(tmp_path, text_file):
    args = ["train", "--preset", "tiny", "--data", str(text_file), "--quiet", "--no-sample",
            *MICRO, "train.steps=40", "train.save_every=5", "train.eval_every=0"]
    full = run_cli([*args, "--out", str(tmp_path / "full")])
    killed = run_cli([*args, "--out", str(tmp_path / "killed")])
    wait_for(tmp_path / "killed" / "step-00000010", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert full.wait(timeout=300) == 0, full.communicate()[1]
    assert len(losses(tmp_path / "killed")) < 40  # it really was cut short
    resumed = run_cli(["train", "--out", str(tmp_path / "killed"), "--resume", "--quiet", "--no-sample"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, text_file):
    run = tmp_path / "run"
    proc = run_cli(["train", "--preset", "tiny", "--data", str(text_file), "--quiet", "--no-sample", "--out", str(run),
                    *MICRO, "train.steps=100000", "train.save_every=0", "train.eval_every=0"])
    metrics = run / "metrics.jsonl"
    wait_for(metrics, proc)
    while len(metrics.read_text().splitlines()) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err
    step = int((run / "latest").read_text().strip().split("-")[1])
    assert step >= 3 and f"interrupted at step {step}" in out
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def cli_error(capsys, args):
    code = main(args)
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    return captured.err.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/no/such/path"], "/no/such/path does not exist"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["moe.num_expert=4"], "unknown config key 'moe.num_expert'"),
        (["train.steps=many"], "train.steps='many' is invalid"),
        (["moe.top_k=9"], "top_k=9"),
    ],
)
def test_bad_training_input_gets_one_clear_message(tmp_path, capsys, text_file, args, message):
    if "--data" not in args:
        args = ["--data", str(text_file), *args]
    if "--preset" not in args:
        args = ["--preset", "tiny", *args]
    err = cli_error(capsys, ["train", *args, "--out", str(tmp_path / "run")])
    assert message in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_empty_data_file_is_named(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    err = cli_error(capsys, ["train", "--preset", "tiny", "--data", str(empty), "--out", str(tmp_path / "run")])
    assert str(empty) in err


def test_too_small_corpus_is_refused_before_the_run_folder_exists(tmp_path, capsys):
    small = tmp_path / "small.txt"
    small.write_text("def f():\n    pass\n")
    err = cli_error(capsys, ["train", "--preset", "tiny", "--data", str(small), "--out", str(tmp_path / "run")])
    assert len(err.splitlines()) == 1 and f"the corpus {small} is too small" in err and "needs at least 65" in err, err
    assert not (tmp_path / "run").exists()  # no run folder holding an empty metrics.jsonl


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file):
    run = tmp_path_factory.mktemp("trained") / "run"
    cfg = resolve_run_config("tiny", None, MICRO + ["train.steps=4", "train.eval_every=0"], str(text_file))
    train_lm(cfg, run, progress=False)
    return run


def test_inspect_reports_parameters_and_load(trained, capsys, tmp_path):
    heatmap = tmp_path / "load.png"
    assert main(["inspect", str(trained), "--heatmap", str(heatmap), "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "active per token" in out and "max/mean" in out
    assert heatmap.stat().st_size > 1000


def test_inspect_says_how_many_batches_its_validation_loss_used(trained, capsys):
    assert main(["inspect", str(trained), "--batches", "3"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("validation loss"))
    assert line.endswith("(3 batches; training evaluated 1)"), line


def test_checkpoint_from_another_config_names_the_tensor(trained, capsys, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(trained / "step-00000004", other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["moe"]["expert_hidden"] = 48
    (other / "config.json").write_text(json.dumps(config))
    err = cli_error(capsys, ["inspect", str(other)])
    assert "w_in_EHD" in err and "96" in err and "64" in err


def test_truncated_checkpoint_is_reported(trained, capsys, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained / "step-00000004", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = cli_error(capsys, ["inspect", str(broken)])
    assert "model.safetensors" in err


def test_resume_of_an_empty_directory_is_named(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    err = cli_error(capsys, ["train", "--out", str(tmp_path / "nothing"), "--resume"])
    assert "nothing" in err


def test_bpe_tokenizer_is_trained_and_saved(tmp_path, text_file):
    from moekit.data.text import Tokenizer

    cfg = resolve_run_config("tiny", None, MICRO + ["train.steps=2", "train.eval_every=0", "data.tokenizer=bpe",
                                                    "data.bpe_vocab_size=300"], str(text_file))
    summary = train_lm(cfg, tmp_path / "run", progress=False)
    ckpt = summary["result"].checkpoint
    tok = Tokenizer.from_file(ckpt)
    assert tok.vocab_size == 300
    assert json.loads((ckpt / "config.json").read_text())["model"]["vocab_size"] == 300
    assert tok.decode(tok.encode("def function_1(x):")) == "def function_1(x):"


def test_bf16_autocast_training_runs_and_learns(tmp_path, text_file):
    cfg = resolve_run_config("tiny", None, MICRO + ["train.steps=12", "train.eval_every=0", "train.precision=bf16"], str(text_file))
    train_lm(cfg, tmp_path / "run", progress=False)
    loss = losses(tmp_path / "run")
    assert all(l == l for l in loss) and loss[-1] < loss[0]


# ---------------------------------------------------------------- resume: overrides, finished runs, unsaved runs

CONSTANT_LR = MICRO + ["train.min_lr_ratio=1.0", "train.eval_every=0", "train.save_every=0"]  # lr fixed after warmup


def test_resume_with_more_steps_continues_from_the_last_step(tmp_path, text_file, capsys):
    # Oracle: with a constant LR after warmup, 6 steps + a resume to 9 must equal 9 uninterrupted steps, bit for bit.
    for steps, name in ((9, "full"), (6, "run")):
        train_lm(resolve_run_config("tiny", None, CONSTANT_LR + [f"train.steps={steps}"], str(text_file)), tmp_path / name,
                 progress=False)
    assert len(losses(tmp_path / "run")) == 6
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--quiet", "--no-sample", "train.steps=9"]) == 0
    assert "trained 9 steps" in capsys.readouterr().out
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 10))
    assert losses(tmp_path / "run") == losses(tmp_path / "full")
    assert (tmp_path / "run" / "latest").read_text().strip() == "step-00000009"
    saved = json.loads((tmp_path / "run" / "step-00000009" / "config.json").read_text())
    assert saved["train"]["steps"] == 9


@pytest.fixture(scope="module")
def finished(tmp_path_factory, text_file):
    run = tmp_path_factory.mktemp("finished") / "run"
    cfg = resolve_run_config("tiny", None, MICRO + ["train.steps=3", "train.eval_every=0"], str(text_file))
    train_lm(cfg, run, progress=False)
    return run


def test_resume_of_a_finished_run_says_it_is_complete(finished, capsys):
    err = cli_error(capsys, ["train", "--out", str(finished), "--resume", "--quiet"])
    assert "complete (at step 3 of 3)" in err and "--resume train.steps=" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("override", ["model.hidden_size=16", "train.lr=1e-3", "moe.top_k=1"])
def test_resume_refuses_overrides_that_change_the_run(finished, capsys, override):
    err = cli_error(capsys, ["train", "--out", str(finished), "--resume", override])
    assert repr(override) in err
    for allowed in ("train.steps", "train.eval_every", "train.eval_batches", "train.save_every", "train.keep_last"):
        assert allowed in err
    assert (finished / "latest").read_text().strip() == "step-00000003"  # untouched


@pytest.mark.parametrize("flags", [["--preset", "tiny"], ["--config", "my.json"], ["--data", "corpus.txt"]])
def test_resume_refuses_preset_config_and_data(finished, capsys, flags):
    err = cli_error(capsys, ["train", "--out", str(finished), "--resume", *flags])
    assert flags[0] in err and "--resume" in err


def test_resume_before_the_first_checkpoint_says_to_start_again(tmp_path, capsys):
    run = tmp_path / "killed"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    err = cli_error(capsys, ["train", "--out", str(run), "--resume"])
    assert "no checkpoint yet" in err and "without --resume" in err and "neither" not in err


def test_after_training_sample_is_the_engines_generation(tmp_path, text_file, capsys):
    # Oracle: the generation engine run on the saved checkpoint with the sampling settings the header states.
    from moekit.infer import Engine

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(text_file), "--quiet", "--out", str(run),
                 *MICRO, "train.steps=3", "train.eval_every=0"]) == 0
    out = capsys.readouterr().out
    expected = Engine.load(run).generate(["def "], temperature=0.7, top_p=0.95, repetition_penalty=1.1, seed=0)[0].text
    header = "--- sample (prompt 'def '; temperature 0.7, top-p 0.95, repetition penalty 1.1, seed 0) ---"
    assert f"{header}\ndef {expected}\n---" in out


def test_dense_model_trains_and_evaluates_without_an_expert_load_map(tmp_path, text_file):
    cfg = resolve_run_config("tiny", None, MICRO + ["model.ffn=dense", "train.steps=4", "train.eval_every=2", "train.save_every=4"],
                             str(text_file))
    summary = train_lm(cfg, tmp_path / "run", progress=False)
    assert not any(layer.is_moe for layer in summary["model"].layers)
    assert summary["result"].last_eval["val_loss"] > 0
    assert not (tmp_path / "run" / "expert_load.png").exists()  # nothing to plot for a dense model
