"""Tests of benchmarks/gpu_check.py's CPU-side logic: arguments, refusals, the report writer, a fake-device run.

Nothing here needs or uses a GPU (and nothing is marked `gpu`): the steps' CUDA work itself is only
checked by running benchmarks/gpu_check.sh on a machine with one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def record(step: str, status: str, details: dict | None = None, tail: str = "") -> dict:
    run = {"rc": 0 if status == "pass" else 1, "seconds": 1.5, "output": tail, "timed_out": status == "timeout"}
    return gpu_check.step_record(step, run, details, status if status == "skip" else None)


def test_without_cuda_and_without_fake_device_it_refuses_with_one_message(capsys):
    assert gpu_check.check_device(None, cuda_available=True) == "cuda"
    assert gpu_check.check_device("cpu", cuda_available=False) == "cpu"
    with pytest.raises(gpu_check.UsageError, match=r"no CUDA device.*--fake-device cpu"):
        gpu_check.check_device(None, cuda_available=False)
    if not __import__("torch").cuda.is_available():
        assert gpu_check.main([]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no CUDA device is available" in err and "Traceback" not in err


def test_a_bad_only_step_is_refused_naming_the_valid_steps(capsys):
    assert gpu_check.main(["--fake-device", "cpu", "--only", "train,bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bogus" in err and "pytest, parity, train, layer, decode" in err
    assert gpu_check.main(["--fake-device", "cpu", "--only", ","]) == 2
    assert gpu_check.main(["--fake-device", "cpu", "--timeout-scale", "0"]) == 2
    assert gpu_check.selected_steps("decode,train") == ["train", "decode"]  # run in the script's order
    assert gpu_check.selected_steps(None) == list(gpu_check.STEPS)


def test_the_refusal_from_the_command_line_has_no_traceback():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "valid steps are" in proc.stderr


def test_step_records_and_worker_output():
    assert record("layer", "pass")["status"] == "pass"
    assert record("layer", "fail")["status"] == "fail"
    assert record("layer", "timeout")["status"] == "timeout"
    assert record("layer", "skip")["status"] == "skip"
    assert record("layer", "fail", tail="x" * 5000)["tail"] == "x" * gpu_check.TAIL_CHARS
    out = "noise\n" + gpu_check.RESULT_TAG + json.dumps({"ok": True, "v": 3}) + "\nmore noise\n"
    assert gpu_check.worker_result(out) == {"ok": True, "v": 3}
    assert gpu_check.worker_result("no result here") is None
    assert gpu_check.worker_result(gpu_check.RESULT_TAG + "{broken") is None


def test_a_timed_out_command_is_killed_and_reported():
    run = gpu_check.run_boxed([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"], 1.0)
    assert run["timed_out"] and run["seconds"] < 10 and "started" in run["output"]
    assert gpu_check.step_record("parity", run)["status"] == "timeout"


def test_loss_summary_and_metrics_reading(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": i + 1, "loss": 5.0 - 0.1 * i} for i in range(30)] + [{"step": 30, "val_loss": 2.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = gpu_check.training_losses(metrics)
    assert len(losses) == 30
    s = gpu_check.loss_summary(losses)
    assert s["loss_fell"] and s["window"] == 10 and s["first_loss"] > s["last_loss"]
    assert not gpu_check.loss_summary([5.0, 5.5])["loss_fell"]
    assert gpu_check.loss_summary([5.0, 4.0])["window"] == 1


def _targets(records):
    return {t["name"]: t for t in gpu_check.compute_targets(records)}


def test_targets_met_and_unmet():
    good = [record("train", "pass", {"loss_fell": True}), record("decode", "pass", {"batch32_over_batch1": 9.5})]
    t = _targets(good)
    assert all(x["met"] for x in t.values()) and len(t) == 4
    bad = [record("train", "pass", {"loss_fell": False}), record("decode", "pass", {"batch32_over_batch1": 7.9})]
    t = _targets(bad)
    assert t["step train passed"]["met"] and t["step decode passed"]["met"]
    assert [x["met"] for n, x in t.items() if not n.startswith("step")] == [False, False]


def test_a_failing_step_makes_its_targets_unmet():
    # a decode step that timed out but had printed a ratio must not count the ratio; a failed train no loss_fell
    recs = [record("pytest", "fail"), record("train", "fail", {"loss_fell": True}),
            record("decode", "timeout", {"batch32_over_batch1": 20.0}), record("layer", "skip")]
    t = _targets(recs)
    assert not any(x["met"] for x in t.values())
    assert t["decode: batch-32 tok/s / batch-1 tok/s"]["value"] == 0.0


def test_markdown_renders_each_status_and_the_tails_of_steps_that_did_not_pass():
    recs = [record("pytest", "pass"), record("parity", "fail", tail="AssertionError: parity off"),
            record("layer", "skip", {"skip": True}), record("decode", "timeout", tail="still decoding")]
    result = gpu_check.build_result(recs, "cpu", fake=True, command="python benchmarks/gpu_check.py --fake-device cpu")
    md = gpu_check.render_markdown(result)
    for status in ("| PASS |", "| FAIL |", "| SKIP |", "| TIMEOUT |"):
        assert status in md
    assert "AssertionError: parity off" in md and "still decoding" in md and "FAKE" in md
    assert "### pytest" not in md  # a passing step shows no tail
    assert "| step parity passed | 0.0 | >= 1.0 | NO |" in md
    assert set(result) >= {"targets", "machine", "command", "steps"} and result["not_run"] is False


def test_fake_device_run_of_one_cheap_step_writes_both_files(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--fake-device", "cpu", "--only", "parity", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["fake_device"] is True and result["machine"]["device"] == "cpu" and "--fake-device" in result["command"]
    assert [s["step"] for s in result["steps"]] == ["parity"] and result["steps"][0]["status"] == "pass"
    assert result["steps"][0]["details"]["engine_tokens_equal"] is True
    assert [t["met"] for t in result["targets"]] == [True]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "FAKE" in md and "| parity | PASS |" in md


def test_the_committed_placeholder_says_not_run():
    res = ROOT / "benchmarks" / "results"
    data = json.loads((res / "gpu_check.json").read_text())
    if data.get("not_run"):
        assert data["targets"] == [] and "machine" in data and "command" in data
        assert "NOT RUN" in (res / "gpu_check.md").read_text()
