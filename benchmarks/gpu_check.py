"""GPU check: moekit's CUDA paths (tests, training, the MoE layer, decoding) on one GPU, each step time-boxed.

Steps, each run in its own subprocess with its own timeout (pass / fail / skip / timeout, seconds, output tail):
  pytest  `pytest -m gpu tests` (the suite's CUDA tests), then the engine and training tests, which take
          their CUDA branches when CUDA exists;
  parity  the CUDA variants the suite lacks: MoELayer forward+backward on the device against the same
          layer on the CPU in fp32 (moekit's experts kernel, grouped_mm where native), and
          `Engine.load(..., device=...)` greedy decoding against the CPU engine's tokens;
  train   `moekit train --preset small train.steps=200 train.device=cuda train.precision=bf16`; the loss
          must fall (mean of the last 10 logged training losses < mean of the first 10);
  layer   MoELayer forward+backward against transformers' grouped_mm experts and a dense SwiGLU MLP of
          equal active FLOPs (medians of interleaved rounds; reported, no goal);
  decode  decode tokens/s at batch 1 and 32 on benchmarks/_cpu_bench.py's 1B Mixtral-like model in bf16.
Targets: each step passed; the loss fell; batch-32 decode tok/s >= 8x batch-1.
Writes <out>/gpu_check.json (targets, machine, command) and gpu_check.md.

Without CUDA it refuses (exit 2) unless --fake-device cpu is given: a test mode running the same
orchestration on the CPU at tiny sizes (2 training steps of the tiny preset, the tiny model).
This file holds the driver and its step workers (`--worker STEP`); no test and no CI job.
    bash benchmarks/gpu_check.sh                       # on a machine with one GPU, after the README's setup
    python benchmarks/gpu_check.py --fake-device cpu --only layer --out /tmp/gc
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

STEPS = ("pytest", "parity", "train", "layer", "decode")
TIMEOUTS_S = {"pytest": 100, "parity": 45, "train": 140, "layer": 60, "decode": 130}  # 475 s: under 8 minutes
TAIL_CHARS = 1500
DECODE_GOAL = 8.0
RESULT_TAG = "GPU_CHECK_RESULT "


class UsageError(Exception):
    """A bad command line: reported as one message, exit code 2."""


# ------------------------------------------------------------------ arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="directory for gpu_check.json and .md")
    p.add_argument("--only", help="comma-separated subset of the steps: " + ",".join(STEPS))
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every step's timeout by this")
    p.add_argument("--fake-device", choices=["cpu"], help="test mode: the same orchestration on the CPU, tiny sizes")
    p.add_argument("--worker", choices=STEPS, help=argparse.SUPPRESS)  # internal: run one step's body
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def selected_steps(only: str | None) -> list[str]:
    if only is None:
        return list(STEPS)
    names = [s.strip() for s in only.split(",") if s.strip()]
    bad = [s for s in names if s not in STEPS]
    if bad or not names:
        raise UsageError(f"--only {only!r}: unknown step {', '.join(bad) or '(none given)'}; "
                         f"valid steps are {', '.join(STEPS)}")
    return [s for s in STEPS if s in names]


def check_device(fake_device: str | None, cuda_available: bool) -> str:
    """The device the steps run on, or a UsageError when there is no CUDA and no --fake-device."""
    if fake_device:
        return fake_device
    if not cuda_available:
        raise UsageError("no CUDA device is available (torch.cuda.is_available() is False): run this on a machine "
                         "with one GPU, or pass --fake-device cpu to test the orchestration on the CPU")
    return "cuda"


# ------------------------------------------------------------------ running steps


def run_boxed(cmd: list[str], timeout_s: float, cwd: Path = ROOT) -> dict:
    """Run `cmd` in its own process group; kill the group at the timeout. Returns rc, seconds, output, timed_out."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        timed_out = True
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - start, 2), "output": out or "",
            "timed_out": timed_out}


def worker_result(output: str) -> dict | None:
    """The details a worker printed on its last RESULT_TAG line, or None."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_TAG):
            try:
                return json.loads(line[len(RESULT_TAG):])
            except json.JSONDecodeError:
                return None
    return None


def step_record(name: str, run: dict, details: dict | None = None, status: str | None = None) -> dict:
    """One step's record: status pass / fail / skip / timeout, seconds, output tail, details."""
    if status is None:
        status = "timeout" if run["timed_out"] else "pass" if run["rc"] == 0 else "fail"
    return {"step": name, "status": status, "seconds": run["seconds"], "rc": run["rc"],
            "tail": run["output"][-TAIL_CHARS:], "details": details or {}}


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def run_pytest(device: str, timeout_s: float, tiny: bool) -> dict:
    """pytest -m gpu, then the engine and training tests (their CUDA branches run where CUDA exists)."""
    first = run_boxed(_py("-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "tests"), timeout_s)
    files = ["tests/test_train_device.py"] if tiny else ["tests/test_engine.py", "tests/test_train_device.py"]
    second = {"rc": 0, "seconds": 0.0, "output": "", "timed_out": False}
    if not first["timed_out"]:
        second = run_boxed(_py("-m", "pytest", "-p", "no:cacheprovider", *files), max(1.0, timeout_s - first["seconds"]))
    # pytest exits 5 when -m gpu selects nothing: that part is then a skip, not a failure
    gpu_rc = 0 if first["rc"] == 5 else first["rc"]
    run = {"rc": gpu_rc or second["rc"], "seconds": round(first["seconds"] + second["seconds"], 2),
           "output": first["output"][-TAIL_CHARS // 2:] + "\n" + second["output"],
           "timed_out": first["timed_out"] or second["timed_out"]}
    details = {"pytest_gpu_rc": first["rc"], "pytest_files": files, "pytest_files_rc": second["rc"]}
    return step_record("pytest", run, details)


def training_losses(metrics_path: Path) -> list[float]:
    """The training losses logged in a run's metrics.jsonl (evaluation lines carry no `loss`)."""
    losses = []
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "loss" in row:
                losses.append(float(row["loss"]))
    return losses


def loss_summary(losses: list[float], window: int = 10) -> dict:
    w = max(1, min(window, len(losses) // 2))
    first, last = statistics.mean(losses[:w]), statistics.mean(losses[-w:])
    return {"steps_logged": len(losses), "window": w, "first_loss": round(first, 4), "last_loss": round(last, 4),
            "loss_fell": last < first}


def run_train(device: str, timeout_s: float, tiny: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as tmp:
        out = Path(tmp) / "run"
        preset, steps = ("tiny", 2) if tiny else ("small", 200)
        precision = "fp32" if device == "cpu" else "bf16"
        cmd = _py("-m", "moekit", "train", "--preset", preset, f"train.steps={steps}", f"train.device={device}",
                  f"train.precision={precision}", "--out", str(out), "--quiet", "--no-sample")
        run = run_boxed(cmd, timeout_s)
        details: dict = {"command": " ".join(["python", *cmd[1:]])}
        metrics = out / "metrics.jsonl"
        if not run["timed_out"] and run["rc"] == 0:
            if not metrics.is_file():
                return step_record("train", run, details, status="fail")
            details.update(loss_summary(training_losses(metrics)))
    return step_record("train", run, details)


def run_worker_step(name: str, device: str, timeout_s: float, tiny: bool) -> dict:
    cmd = _py(str(Path(__file__).resolve()), "--worker", name, "--device", device, *(["--tiny"] if tiny else []))
    run = run_boxed(cmd, timeout_s)
    details = worker_result(run["output"])
    status = None
    if details is None and run["rc"] == 0:  # exited cleanly without reporting: not a pass
        status = "fail"
    elif details and details.get("skip"):
        status = "skip"
    return step_record(name, run, details, status)


def run_step(name: str, device: str, timeout_s: float, tiny: bool) -> dict:
    if name == "pytest":
        return run_pytest(device, timeout_s, tiny)
    if name == "train":
        return run_train(device, timeout_s, tiny)
    return run_worker_step(name, device, timeout_s, tiny)


# ------------------------------------------------------------------ step workers (run in the subprocess)


def worker_parity(device: str, tiny: bool) -> dict:
    """On `device`: MoELayer fp32 fwd+bwd vs the CPU's; the experts kernel (grouped_mm in bf16 on CUDA) vs an
    fp32 CPU reference on the same bf16-rounded values; Engine greedy decoding vs the CPU engine's tokens."""
    import torch

    from moe_layer import SHAPES, moekit_layer

    torch.manual_seed(0)
    shape = dict(SHAPES["a"], experts=8, width=64, hidden=64) if tiny else SHAPES["a"]
    tokens = 64 if tiny else 1024
    ref = moekit_layer(shape)
    dev = moekit_layer(shape)
    dev.load_state_dict(ref.state_dict())
    dev.to(device)
    x = torch.randn(1, tokens, shape["hidden"])
    y_ref, g_ref = _fwd_bwd(ref, x)
    y_dev, g_dev = _fwd_bwd(dev, x.to(device))
    details = {"layer_fp32_out_rel_err": _rel(y_dev, y_ref), "layer_fp32_grad_rel_err": _rel(g_dev, g_ref),
               "layer_fp32_kernel": dev.experts.kernel_for(x.to(device).reshape(tokens, -1)), "layer_tolerance": 1e-3}
    details.update(_experts_parity(ref.experts, device, tokens * shape["top_k"]))
    details.update(_engine_parity(device, tiny))
    details["ok"] = (max(details["layer_fp32_out_rel_err"], details["layer_fp32_grad_rel_err"]) <= 1e-3
                     and details["experts_rel_err"] <= details["experts_tolerance"] and details["engine_tokens_equal"])
    return details


def _rel(a, b) -> float:
    """||a - b|| / ||b||, a on any device and dtype, b the fp32 CPU reference."""
    return float((a.float().cpu() - b).norm() / b.norm())


def _fwd_bwd(layer, x):
    import torch

    x = x.detach().requires_grad_(True)
    y = layer(x)
    y = y[0] if isinstance(y, tuple) else y
    y.backward(torch.ones_like(y))
    return y.detach(), layer.experts.w_in_EHD.grad.detach()


def _experts_parity(experts, device: str, rows: int) -> dict:
    """The experts kernel on `device` (bf16 grouped_mm on CUDA, `auto` in fp32 on the CPU) vs fp32 `loop` on the CPU."""
    import copy

    import torch

    from moekit.moe.experts import grouped_mm_supported

    dtype, kernel = (torch.float32, "auto") if device == "cpu" else (torch.bfloat16, "grouped_mm")
    ref = copy.deepcopy(experts).to(dtype).float()  # the same rounded weights, computed in fp32
    dev = copy.deepcopy(experts).to(device=device, dtype=dtype)
    E = experts.w_in_EHD.shape[0]
    counts_E = torch.bincount(torch.randint(0, E, (rows,)), minlength=E)
    x = torch.randn(rows, experts.w_in_EHD.shape[-1]).to(dtype)
    y_ref = ref(x.float(), counts_E, kernel="loop")
    x_dev = x.to(device)
    y_dev = dev(x_dev, counts_E.to(device), kernel=kernel)
    return {"experts_dtype": str(dtype), "experts_kernel": dev.kernel_for(x_dev, counts_E.to(device), kernel),
            "grouped_mm_native": bool(grouped_mm_supported(x_dev, dev.w_in_EHD, dev.w_out_EDF)),
            "experts_rel_err": _rel(y_dev, y_ref), "experts_tolerance": 1e-4 if dtype == torch.float32 else 3e-2}


def _engine_parity(device: str, tiny: bool) -> dict:
    from _cpu_bench import model_dir

    from moekit.infer import Engine

    path = model_dir("tiny")
    prompt = [[1, 5, 9, 17, 33, 65, 129]]
    cpu = Engine.load(path, device="cpu").generate_ids(prompt, _sampling(8))[0].token_ids
    on_dev = Engine.load(path, device=device).generate_ids(prompt, _sampling(8))[0].token_ids
    return {"engine_tokens_cpu": list(cpu), "engine_tokens_device": list(on_dev), "engine_tokens_equal": cpu == on_dev}


def _sampling(new_tokens: int):
    from moekit.infer.sampling import SamplingConfig

    return SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)


def worker_layer(device: str, tiny: bool) -> dict:
    """moekit MoELayer vs transformers' grouped_mm block vs a dense MLP of equal active FLOPs, fwd+bwd."""
    import torch

    from _common import interleaved_times, median
    from moe_layer import SHAPES, hf_block, moekit_layer, share_weights, train_fn

    from moekit.modules import SwiGLU

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokens, reps = (64, 3) if tiny else (4096, 15)
    rows = {}
    for key, shape in SHAPES.items():
        if tiny:
            shape = dict(shape, hidden=64, width=32)
        torch.manual_seed(0)
        layer = moekit_layer(shape)
        with torch.no_grad():
            layer.router.gate.weight.normal_(0, 0.02)
        models = {"moekit": layer, "dense MLP": SwiGLU(shape["hidden"], shape["top_k"] * shape["width"])}
        try:
            block = hf_block(shape, "grouped_mm")
            share_weights(layer, block)
            models["transformers grouped_mm"] = block
        except Exception as e:  # an older transformers without it: reported, the rest still timed
            rows[f"{key}: transformers grouped_mm"] = f"not run ({type(e).__name__}: {str(e)[:120]})"
        x = torch.randn(1, tokens, shape["hidden"], device=device, dtype=dtype)
        grad_y = torch.randn_like(x)
        fns = {}
        for name, m in models.items():
            m.to(device=device, dtype=dtype).train()
            fns[name] = train_fn(m, x, grad_y)
        times = interleaved_times(fns, reps=reps, warmup=2, device=device)
        ms = {n: median(t) * 1e3 for n, t in times.items()}
        rows[f"{key} ({shape['label']}) ms"] = {n: round(v, 3) for n, v in ms.items()}
        rows[f"{key} moekit speedup (peer ms / moekit ms)"] = {n: round(v / ms["moekit"], 3) for n, v in ms.items() if n != "moekit"}
    return {"dtype": str(dtype), "tokens": tokens, "rounds": reps, "timings": rows, "ok": True}


def worker_decode(device: str, tiny: bool) -> dict:
    """Decode tokens/s at batch 1 and 32 (bf16 on CUDA), median of interleaved rounds."""
    import torch

    from _cpu_bench import model_dir

    from moekit.infer import Engine

    name = "tiny" if tiny else "1b"
    dtype = "float32" if device == "cpu" else "bfloat16"
    engine = Engine.load(model_dir(name), device=device, dtype=dtype)
    new_tokens, rounds = (8, 1) if tiny else (64, 3)
    cfg = _sampling(new_tokens)
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(1, 500, (b, 16), generator=g).tolist() for b in (1, 32)}
    for b in (1, 32):  # warm-up (CUDA context, kernels, allocator)
        engine.generate_ids(prompts[b], cfg)
    rates: dict[int, list[float]] = {1: [], 32: []}
    for _ in range(rounds):
        for b in (1, 32):
            engine.generate_ids(prompts[b], cfg)
            rates[b].append(engine.last_stats["decode_tokens_per_s"])
    tok_s = {b: statistics.median(r) for b, r in rates.items()}
    return {"model": name, "dtype": dtype, "new_tokens": new_tokens, "rounds": rounds,
            "tok_s_batch1": round(tok_s[1], 2), "tok_s_batch32": round(tok_s[32], 2),
            "batch32_over_batch1": round(tok_s[32] / tok_s[1], 3) if tok_s[1] else 0.0, "ok": True}


WORKERS = {"parity": worker_parity, "layer": worker_layer, "decode": worker_decode}


def run_as_worker(args: argparse.Namespace) -> int:
    details = WORKERS[args.worker](args.device, args.tiny)
    print(RESULT_TAG + json.dumps(details), flush=True)
    return 0 if details.get("ok") else 1


# ------------------------------------------------------------------ report


def compute_targets(records: list[dict]) -> list[dict]:
    """Each step passed; the loss fell (train); batch-32 decode >= 8x batch-1 (decode). A step that did not
    pass makes its own detail targets unmet (value 0)."""
    from _common import target

    targets = [target(f"step {r['step']} passed", float(r["status"] == "pass"), 1.0) for r in records]
    by_step = {r["step"]: r for r in records}
    if "train" in by_step:
        r = by_step["train"]
        fell = r["status"] == "pass" and bool(r["details"].get("loss_fell"))
        targets.append(target("train: loss fell (mean of the last 10 logged losses < first 10)", float(fell), 1.0))
    if "decode" in by_step:
        r = by_step["decode"]
        ratio = r["details"].get("batch32_over_batch1", 0.0) if r["status"] == "pass" else 0.0
        targets.append(target("decode: batch-32 tok/s / batch-1 tok/s", ratio, DECODE_GOAL))
    return targets


def render_markdown(result: dict) -> str:
    from _common import markdown_table

    m = result["machine"]
    lines = ["# GPU check", "",
             f"Device {m.get('gpu', m['device'])}{' (FAKE: a CPU test run, not a GPU result)' if result['fake_device'] else ''}; "
             f"torch {m['torch']}; command `{result['command']}`.", "",
             markdown_table(["step", "status", "seconds", "details"],
                            [[r["step"], r["status"].upper(), r["seconds"], _short(r["details"])] for r in result["steps"]]),
             "", "## Targets", "",
             markdown_table(["target", "value", "goal", "met"],
                            [[t["name"], t["value"], f"{t['direction']} {t['goal']}", "yes" if t["met"] else "NO"]
                             for t in result["targets"]])]
    for r in result["steps"]:
        if r["status"] != "pass":
            lines += ["", f"### {r['step']}: {r['status']} (output tail)", "", "```", r["tail"].strip()[-TAIL_CHARS:], "```"]
    return "\n".join(lines)


def _short(details: dict) -> str:
    text = json.dumps({k: v for k, v in details.items() if k not in ("ok", "timings")})
    if "timings" in details:
        text += " " + json.dumps(details["timings"])
    return text.replace("|", "/")[:600]


def build_result(records: list[dict], device: str, fake: bool, command: str) -> dict:
    from _common import machine_info

    return {"machine": machine_info(device), "command": command, "fake_device": fake, "not_run": False,
            "steps": records, "targets": compute_targets(records)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_as_worker(args)
    try:
        steps = selected_steps(args.only)
        if args.timeout_scale <= 0:
            raise UsageError(f"--timeout-scale {args.timeout_scale} must be positive")
        import torch

        device = check_device(args.fake_device, torch.cuda.is_available())
    except UsageError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    from _common import command_line, write_results

    records = []
    for name in steps:
        print(f"[gpu_check] {name} ...", flush=True)
        rec = run_step(name, device, TIMEOUTS_S[name] * args.timeout_scale, tiny=args.fake_device is not None)
        print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']} s", flush=True)
        records.append(rec)
    result = build_result(records, device, args.fake_device is not None, command_line())
    paths = write_results("gpu_check", result, render_markdown(result), args.out)
    met = sum(t["met"] for t in result["targets"])
    print(f"[gpu_check] targets met: {met} of {len(result['targets'])}; wrote {paths[0]} and {paths[1]}")
    return 0 if met == len(result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
