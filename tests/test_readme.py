"""Every command line README.md shows runs, as written, in order (with tiny sizes substituted).

The commands are extracted from README.md's code blocks (lines starting with
`moekit `, `python -m moekit` or `torchrun ... -m moekit`) and run through
the CLI's `main` (torchrun: a subprocess) in one temporary directory, in README order (which is dependency
order: a run is trained before it is inspected, resumed, converted or
generated from; `moekit pregate` before `generate --pregate`). What is changed
so they run in seconds on a CPU, and nothing else:

- `--preset small` becomes `--preset tiny`; new training (and distillation) runs get FAST_TRAIN
  overrides (4 steps, small corpus); resumes to N steps resume to EXTEND_TO;
- `moekit pregate` gets FAST_PREGATE, `moekit moefy` FAST_MOEFY, `train-forecaster` FAST_FORECASTER,
  `eval-forecast` FAST_EVAL; torchrun gets `--standalone` (a free port);
- `runs/demo` (what `make demo` writes) is a tiny run trained first; `my.json`,
  `corpus.txt`, `code.txt`, `prose.txt` (calibration text) and `my_series.csv` are written; the ETT CSVs come from
  ../shared (the forecasting test is skipped with a message where it is absent);
- before a plain `--resume` the run is cut back to its step-2 checkpoint, as a
  run killed after that checkpoint would be;
- `moekit serve` runs as a background subprocess on a free loopback port
  (its `--port` replaced): the test waits for /health, asks for a completion
  from the model id the README uses, then stops it with SIGTERM (exit 0).

The language-model commands run in the default suite; the forecasting and
torchrun commands are marked slow. test_every_readme_command_is_run checks that
no command shown in the README is left out.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
SHARED = ROOT / ".." / "shared" / "data" / "timeseries"

FAST_TRAIN = ["train.steps=4", "train.save_every=2", "train.eval_every=2", "train.eval_batches=1", "data.max_bytes=60000"]
EXTEND_TO = "train.steps=6"
FAST_PREGATE = ["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--quiet"]
FAST_FORECASTER = ["train.steps=4", "train.seq_len=48", "train.batch_size=4", "train.eval_every=2", "train.save_every=2",
                   "train.eval_batches=1", "train.warmup_steps=1"]
FAST_EVAL = ["--stride", "400", "--context", "96", "--quiet"]
FAST_MOEFY = ["--rounds", "1", "--router-steps", "4"]
FORECASTING = ("train-forecaster", "forecast", "eval-forecast", "pretrain-forecaster", "export-forecaster")
FAST_PRETRAIN = ["model.hidden_size=16", "model.intermediate_size=32", "model.num_layers=1", "model.num_heads=2",
                 "train.seq_len=48", "train.batch_size=4", "train.steps=2", "train.save_every=0", "train.eval_every=0",
                 "corpus.synthetic=2", "corpus.synthetic_length=64", "--data-dir", ".", "--quiet"]


def readme_commands() -> list[str]:
    text = README.read_text()
    lines = [line.strip() for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) for line in block.splitlines()]
    return [line for line in lines if line.startswith(("moekit ", "python -m moekit "))
            or (line.startswith("torchrun ") and " -m moekit " in line)]


def kind(command: str) -> str:
    argv = shlex.split(command, comments=True)
    if argv[0] == "torchrun":
        return "torchrun"
    sub = argv[argv.index("moekit") + 1] if argv[0] == "moekit" or "moekit" in argv else None
    if sub in FORECASTING:
        return "forecasting"
    if sub in ("train", "inspect", "generate", "convert", "pregate", "serve", "quantize", "moefy",
               "distill"):
        return "language-model"
    raise AssertionError(f"README command {command!r}: no test runs this kind of command")


def adapt(command: str) -> list[str]:
    """argv for `command` with the substitutions listed in the module docstring."""
    argv = shlex.split(command, comments=True)
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]]
    elif argv[0] == "python":  # python -m moekit: the same entry point as moekit
        argv = argv[2:]
    argv = ["tiny" if a == "small" and argv[i - 1] == "--preset" else a for i, a in enumerate(argv)]
    sub = argv[argv.index("moekit") + 1]
    if sub == "train" and "--resume" in argv:
        argv = [EXTEND_TO if a.startswith("train.steps=") else a for a in argv]
    elif sub in ("train", "distill"):
        argv = _add_overrides([a for a in argv if not a.startswith("train.steps=")], FAST_TRAIN)
    elif sub == "pregate":
        argv += FAST_PREGATE
    elif sub == "moefy":
        argv += FAST_MOEFY
    elif sub == "train-forecaster":
        argv = _add_overrides(argv, FAST_FORECASTER) + ["--quiet"]
    elif sub == "eval-forecast":
        argv += FAST_EVAL
    elif sub == "pretrain-forecaster":  # the ETT files are linked into the working directory
        argv += FAST_PRETRAIN
    return argv


def _add_overrides(argv: list[str], extra: list[str]) -> list[str]:
    """Beside the command's own key=value overrides (argparse takes positionals in one run), else at the end."""
    at = max((i + 1 for i, a in enumerate(argv) if "=" in a and not a.startswith("-")), default=len(argv))
    return argv[:at] + extra + argv[at:]


def run(argv: list[str], cwd: Path, capsys) -> str:
    """Run a `moekit ...` argv in this process (the CLI's own main, as `python -m moekit` would), else a subprocess.

    In-process saves each command the seconds a fresh interpreter spends importing torch; `python -m moekit`
    itself is run by a subprocess in test_cli.py and by the torchrun command here.
    """
    if argv[0] == "moekit":
        from moekit.cli.main import main

        os.chdir(cwd)
        code = main(argv[1:])
        out, err = capsys.readouterr()
        assert code == 0, (argv, out[-2000:], err[-3000:])
        return out
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stderr, (argv, done.stdout[-2000:], done.stderr[-3000:])
    return done.stdout


def cut_back_to_step_2(run_dir: Path) -> None:
    """What a run killed right after its step-2 checkpoint leaves behind."""
    for ckpt in run_dir.glob("step-*"):
        if ckpt.name != "step-00000002":
            shutil.rmtree(ckpt)
    (run_dir / "latest").write_text("step-00000002\n")


def run_in_order(commands: list[str], cwd: Path, capsys) -> None:
    for command in commands:
        argv = adapt(command)
        resume_as_is = "--resume" in argv and not any(a.startswith("train.steps=") for a in argv)
        if resume_as_is:
            cut_back_to_step_2(cwd / argv[argv.index("--out") + 1])
        if argv[0] == "moekit" and argv[1] == "serve":
            serve_briefly(argv, cwd)
            continue
        out = run(argv, cwd, capsys)
        if resume_as_is:
            assert "trained 4 steps" in out, out  # it continued from step 2 to the run's end
        if EXTEND_TO in argv:
            assert "trained 6 steps" in out, out


def serve_briefly(argv: list[str], cwd: Path) -> None:
    """`moekit serve ...` in the background on a free port: /health, one completion, then SIGTERM."""
    import signal
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = argv[1:]
    if "--port" in args:
        args[args.index("--port") + 1] = str(port)
    else:
        args += ["--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "moekit", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.time() < deadline, "moekit serve never became healthy"
            time.sleep(0.2)
        model = Path(args[1]).name  # the README says the model id is the directory name
        body = json.dumps({"model": model, "prompt": "def ", "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err, (out[-2000:], err[-3000:])


def test_every_readme_command_is_run():
    commands = readme_commands()
    kinds = {c: kind(c) for c in commands}  # raises for a command no test runs
    assert set(kinds.values()) == {"language-model", "forecasting", "torchrun"}
    assert "moekit convert --to hf --arch mixtral runs/demo out/hf" in [c.split("  ")[0] for c in commands]
    pregate = next(i for i, c in enumerate(commands) if c.startswith("moekit pregate"))
    uses = [i for i, c in enumerate(commands) if "--pregate " in c]
    assert uses and min(uses) > pregate  # dependency order: heads are trained before they are used


def _write_inputs(d: Path) -> None:
    from moekit.config import to_dict
    from moekit.train.lm import resolve_run_config

    (d / "my.json").write_text(json.dumps(to_dict(resolve_run_config("tiny")), indent=2))
    (d / "corpus.txt").write_text("".join(f"def f_{i}(x):\n    return x * {i}\n\n" for i in range(2000)))
    (d / "code.txt").write_text("".join(f"for i in range({i}):\n    total += i\n" for i in range(300)))  # --calib groups
    (d / "prose.txt").write_text("The quick brown fox jumps over the lazy dog. " * 300)


def test_readme_language_model_commands(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    _write_inputs(tmp_path)
    # `make demo` writes runs/demo with --preset small; the stand-in: tiny, with small's 8 experts (so 25% = 2 slots).
    run(adapt("moekit train --preset tiny moe.num_experts=8 --out runs/demo --quiet"), tmp_path, capsys)
    commands = [c for c in readme_commands() if kind(c) == "language-model"]
    assert len(commands) >= 10
    run_in_order(commands, tmp_path, capsys)
    assert (tmp_path / "out" / "hf" / "config.json").is_file()
    assert (tmp_path / "runs" / "demo-pregate").is_dir()


def _write_series(path: Path, rows: int = 800) -> None:
    import math

    lines = ["date,load"] + [f"2021-03-{1 + i // 24:02d} {i % 24:02d}:00:00,{10 + 3 * math.sin(2 * math.pi * i / 24):.4f}"
                             for i in range(rows)]
    path.write_text("\n".join(lines[:1] + lines[1:]) + "\n")


@pytest.mark.slow
def test_readme_forecasting_commands(tmp_path, capsys, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    commands = [c for c in readme_commands() if kind(c) == "forecasting"]
    named = sorted({a for c in commands for a in shlex.split(c, comments=True) if a.startswith("ETT")})
    missing = [n for n in named if not (SHARED / n).is_file()]
    if missing:
        pytest.skip(f"the README's forecasting commands need {', '.join(missing)} from {SHARED.resolve()} (absent)")
    for name in named:
        os.symlink((SHARED / name).resolve(), tmp_path / name)
    _write_series(tmp_path / "my_series.csv")
    run_in_order(commands, tmp_path, capsys)
    assert (tmp_path / "forecast.csv").is_file() and (tmp_path / "forecast.png").is_file()


@pytest.mark.slow
def test_readme_torchrun_command(tmp_path, capsys):
    commands = [c for c in readme_commands() if kind(c) == "torchrun"]
    assert commands
    run_in_order(commands, tmp_path, capsys)


def test_every_name_the_readme_uses_in_code_is_importable_from_where_it_says():
    """`from moekit... import NAMES` lines, and names used in inline code without an import, resolve."""
    import importlib
    import importlib.util

    text = README.read_text()
    imports = re.findall(r"from (moekit[\w.]*) import ([\w, ]+)", text)
    assert imports
    for module, names in imports:
        for name in (n.strip() for n in names.split(",")):
            found = hasattr(importlib.import_module(module), name) or importlib.util.find_spec(f"{module}.{name}")
            assert found, f"README: from {module} import {name}"
    imported = {n.strip() for _, names in imports for n in names.split(",")}
    for name in ("apply_expert_parallel", "init_expert_parallel"):  # used in README's inline code
        assert name not in text or name in imported, f"README uses {name} without saying where it lives"
