"""The `moekit` command's parser: every command registers, and parsing imports nothing heavy."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "matplotlib", "numpy", "safetensors")


def _modules_loaded_by(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_help_imports_no_heavy_module():
    # Oracle: sys.modules of a fresh interpreter after building the full parser and printing `moekit --help`.
    code = ("import contextlib, io\nfrom moekit.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    try:\n        main(['--help'])\n"
            "    except SystemExit:\n        pass")
    loaded = _modules_loaded_by(code)
    assert "moekit.cli.main" in loaded and "moekit.cli.forecast" in loaded
    assert not [m for m in HEAVY if m in loaded]


def test_python_m_moekit_help_does_not_import_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "moekit", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("train", "inspect", "generate", "convert", "pregate", "train-forecaster", "forecast", "eval-forecast"):
        assert command in done.stdout
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "moekit.cli.main" in imported  # the probe sees moekit's own imports
    assert not [m for m in HEAVY if m in imported]


def test_import_moekit_is_lazy_and_public_names_still_resolve():
    assert "torch" not in _modules_loaded_by("import moekit")
    loaded = _modules_loaded_by("from moekit import MoEConfig, MoELayer; assert MoELayer.__name__ == 'MoELayer'")
    assert "torch" in loaded
    import moekit

    from moekit.config import MoEConfig
    from moekit.moe.layers import MoELayer, pyramid_schedule
    from moekit.moe.routing import Routing

    assert (moekit.MoEConfig, moekit.MoELayer, moekit.pyramid_schedule, moekit.Routing) == (MoEConfig, MoELayer,
                                                                                              pyramid_schedule, Routing)
    assert set(moekit.__all__) <= set(dir(moekit))
    with pytest.raises(AttributeError, match="no_such_name"):
        moekit.no_such_name  # noqa: B018


def test_generate_help_shows_the_library_sampling_defaults(capsys):
    from moekit.cli.main import main
    from moekit.infer.sampling import SamplingConfig

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    defaults = SamplingConfig()
    assert f"0 = greedy (default {defaults.temperature})" in out
    assert f"tokens to generate at most (default {defaults.max_new_tokens})" in out


def test_generate_flags_left_out_take_the_library_defaults():
    from moekit.cli.generate import sampling_settings
    from moekit.cli.main import build_parser
    from moekit.infer.sampling import SamplingConfig

    args = build_parser().parse_args(["generate", "m", "--prompt", "x"])
    assert SamplingConfig(**sampling_settings(args)) == SamplingConfig()
    args = build_parser().parse_args(["generate", "m", "--prompt", "x", "--temperature", "0.5", "--seed", "3"])
    assert SamplingConfig(**sampling_settings(args)) == SamplingConfig(temperature=0.5, seed=3)


def test_key_value_overrides_are_taken_anywhere_on_the_line(capsys):
    from moekit.cli.main import build_parser, parse

    parser = build_parser()
    args = parse(parser, ["train", "--preset", "tiny", "train.steps=2", "--out", "runs/x", "moe.top_k=1"])
    assert (args.overrides, args.preset, args.out) == (["train.steps=2", "moe.top_k=1"], "tiny", "runs/x")
    args = parse(parser, ["train", "--out", "o", "a.b=1", "--quiet", "c.d=2", "--preset", "tiny", "e.f=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"] and args.quiet
    args = parse(parser, ["train-forecaster", "--out", "o", "train.steps=5", "--csv", "a.csv", "model.hidden_size=8"])
    assert args.overrides == ["train.steps=5", "model.hidden_size=8"]
    args = parse(parser, ["distill", "teacher", "train.steps=3", "--out", "o", "model.num_layers=1"])
    assert args.positionals == ["teacher", "train.steps=3", "model.num_layers=1"]
    for argv in (["train", "--out", "o", "a=1", "--quiet", "stray"], ["train", "--out", "o", "a=1", "--bogus"],
                 ["inspect", "run", "a=1"]):
        with pytest.raises(SystemExit) as e:
            parse(parser, argv)
        assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_every_option_of_every_command_has_a_help_text():
    import argparse

    from moekit.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings[0] if a.option_strings else a.dest}" for name, p in sub.choices.items()
               for a in p._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert missing == []


def test_train_summary_lines_dense_run_and_resume(tmp_path, capsys):
    from moekit.cli.main import main

    data = tmp_path / "data.txt"
    data.write_text("def add(a, b):\n    return a + b\n" * 200)
    run = tmp_path / "run"
    fast = ["--quiet", "--no-sample", "train.eval_every=2", "train.save_every=2", "train.eval_batches=1",
            "train.seq_len=32", "train.batch_size=2", "train.device=cpu"]
    assert main(["train", "--preset", "tiny", "--data", str(data), "--out", str(run), "model.ffn=dense",
                 "train.steps=2", *fast]) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps in" in out and "resumed" not in out
    assert "heatmap" not in out  # a dense model has no expert load (it printed "expert-load heatmap: None")
    assert main(["train", "--out", str(run), "--resume", "train.steps=3", "--quiet", "--no-sample"]) == 0
    out = capsys.readouterr().out
    assert "trained 1 step in" in out and "(resumed at step 2; the run has trained 3 steps in all)" in out
    assert f"checkpoint: {run / 'step-00000003'}" in out
