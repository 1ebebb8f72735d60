"""Helpers shared by the benchmark scripts: machine info, interleaved median timing, targets, results.

Machines are shared and noisy, so a benchmark times moekit and its peers in
the same process, interleaved round by round, and reports medians and ratios
(see ../shared/DESIGN.md). Each script writes benchmarks/results/<name>.json
(with top-level `targets`, `machine` and `command`) and <name>.md.

This file holds no benchmark of its own and imports nothing from moekit.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info(device: str | torch.device = "cpu") -> dict:
    """Cores, CPU model, library versions and the device a result was measured on."""
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "load_average_1m": load_average(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def load_average() -> float | None:
    """The 1-minute load average (how busy the shared machine was), where the OS reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line() -> str:
    """The command that is running, as one would type it from the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    reps: int,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    deadline: float | None = None,
    min_reps: int = 3,
    limits: dict[str, tuple[int, int]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, timed round-robin so that load spikes hit them all alike.

    Each round runs every function once, in a rotated order; `warmup` rounds
    are run first and discarded. With a `deadline` (a time.perf_counter()
    value), rounds stop early once another would end past it, but never
    before `min_reps` timed rounds. `limits` gives slow peers fewer calls:
    name -> (warmup, reps), run in the rounds just around the first timed one.
    """
    names = list(fns)
    limits = limits or {}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        round_start = time.perf_counter()
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            w, n = limits.get(name, (warmup, reps))
            if not warmup - min(w, warmup) <= r < warmup + n:
                continue
            _sync(device)
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
        done = r + 1 - warmup
        now = time.perf_counter()
        if deadline is not None and done >= min_reps and now + (now - round_start) > deadline:
            break
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator_s: list[float], denominator_s: list[float]) -> float:
    """Median over rounds of numerator / denominator, pairing the i-th samples of `interleaved_times`.

    Calls in one round run back to back, so their ratio cancels slow drifts in
    machine load that the ratio of two medians would keep.
    """
    n = min(len(numerator_s), len(denominator_s))
    return statistics.median(a / b for a, b in zip(numerator_s[:n], denominator_s[:n]))


def per_round_ratios(numerator_s: list[float], denominator_s: list[float]) -> list[float]:
    """numerator / denominator for each round of `interleaved_times` (the i-th samples paired)."""
    return [a / b for a, b in zip(numerator_s, denominator_s)]


def spread(values: list[float]) -> dict:
    """Median, quartiles (IQR), min and max of per-round values: how far one round's figure wanders."""
    vals = sorted(values)
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    med = statistics.median(vals)
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": vals[0], "max": vals[-1], "rounds": len(vals),
            "relative_iqr": (q3 - q1) / med if med else float("inf")}


def target(name: str, value: float, goal: float, direction: str = ">=") -> dict:
    """One entry of a result's `targets` list."""
    if direction not in (">=", "<="):
        raise ValueError(f"direction={direction!r} is invalid: use '>=' or '<='")
    met = value >= goal if direction == ">=" else value <= goal
    return {"name": name, "value": round(float(value), 4), "goal": goal, "direction": direction, "met": bool(met)}


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, result: dict, markdown: str, results_dir: Path | str = RESULTS_DIR) -> tuple[Path, Path]:
    """Write <name>.json and <name>.md atomically; the JSON must carry targets, machine and command."""
    missing = [k for k in ("targets", "machine", "command") if k not in result]
    if missing:
        raise ValueError(f"result for {name!r} lacks {', '.join(missing)} (see ../shared/DESIGN.md)")
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = results_dir / f"{name}.json", results_dir / f"{name}.md"
    for path, text in zip(paths, (json.dumps(result, indent=2) + "\n", markdown.rstrip() + "\n")):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths
