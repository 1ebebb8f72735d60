"""Benchmark: peak memory and decode speed of the ~1B Mixtral-like model resident and with expert budgets.

Claim (issue 12 targets): loading lazily with an expert budget b keeps the peak RSS at most
non-expert bytes + b x expert bytes + 400 MB; loading everything resident at most 1.1 x the model's
bytes + 400 MB; and int4 experts offloaded at a 25% budget decode, from the page cache, at least 0.8x as
fast as all-resident int4. Widths fp32 and int4 (Engine.load(quantize="int4"): experts int4-g32,
the rest fp32; the bytes in the targets are at that width).

How: every (width, budget) cell runs in its own spawned child process (its VmHWM from /proc/self/status
is its own peak; ru_maxrss would be inherited across fork). The model is benchmarks/cpu_decode.py's
cached ~1B one (benchmarks/_cpu_bench.py). Before the load and again before the first decode the
checkpoint's pages are dropped from the page cache (posix_fadvise DONTNEED per file, or, where that
leaves pages cached and it is permitted, /proc/sys/vm/drop_caches: the method used and the fraction
still cached, by fincore, are recorded), so that first decode reads missed experts from disk; the
files are then read once (into the page cache, not into the process) and the decode is timed again
"from the page cache". A cell that the library refuses (e.g. int4 with a budget before quantized
offloading exists) is reported as "not run: <message>".

    python benchmarks/memory.py                 # the ~1B model, 8 cells (~10-20 min)
    python benchmarks/memory.py --quick         # tiny model, ~1 min; writes nothing unless --out DIR
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _common import RESULTS_DIR, command_line, machine_info, markdown_table, target, write_results  # noqa: E402
from _cpu_bench import MODELS, memory_status, model_dir  # noqa: E402

NAME = "memory"
BUDGETS = (None, "50%", "25%", "12.5%")
QUANTIZE = (None, "int4")
SLACK_MB = 400
RESIDENT_FACTOR = 1.1
OFFLOAD_SPEED_GOAL = 0.8
INT4_BYTES_PER_WEIGHT = 0.5 + 4 / 32  # codes + one fp32 scale per group of 32


def model_bytes(name: str, path: Path, quantize: str | None) -> dict:
    """Expert and non-expert bytes at the loaded width (fp32 from the files; int4 experts at 0.625 B/weight)."""
    c = MODELS[name]
    expert_weights = c["num_hidden_layers"] * c["num_local_experts"] * 3 * c["hidden_size"] * c["intermediate_size"]
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    non_expert = total - 4 * expert_weights
    experts = expert_weights * (INT4_BYTES_PER_WEIGHT if quantize == "int4" else 4)
    return {"non_expert_MB": non_expert / 2**20, "expert_MB": experts / 2**20, "model_MB": (non_expert + experts) / 2**20}


# ---------------------------------------------------------------- the page cache


def cached_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' bytes in the page cache (util-linux fincore), or None without it."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, files)],
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    res, size = sum(map(int, out[0::2])), sum(map(int, out[1::2]))
    return res / size if size else None


def drop_cache(files: list[Path], allow_global: bool = True) -> dict:
    """Evict the files from the page cache: fadvise first; drop_caches (every file's pages) if pages stay and it is allowed."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    method, left = "posix_fadvise(POSIX_FADV_DONTNEED)", cached_fraction(files)
    if allow_global and left is not None and left > 0.05:
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            method, left = f"{method}, then /proc/sys/vm/drop_caches (fadvise left {left:.0%})", cached_fraction(files)
        except OSError as e:
            method += f" (drop_caches not permitted: {e.strerror})"
    return {"method": method, "cached_fraction_after": left}


def warm_cache(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


# ---------------------------------------------------------------- one cell, in a child


def decode(engine, prompt: list[int], new_tokens: int) -> dict:
    from moekit.infer import SamplingConfig

    with torch.no_grad():
        engine.generate_ids([prompt], SamplingConfig(max_new_tokens=new_tokens, stop_token_ids=[]))
    st = engine.last_stats
    out = {"decode_tok_s": st["decode_tokens_per_s"], "prefill_s": st["prefill_s"]}
    if st.get("offload"):
        out["offload"] = {k: v for k, v in st["offload"].items() if isinstance(v, (int, float, str))}
    return out


def cell(conn, name: str, budget, quantize, threads: int, new_tokens: int) -> None:
    from moekit.infer import Engine

    torch.set_num_threads(threads)
    path = model_dir(name)  # built by the parent: only looked up here
    files = sorted(path.glob("*.safetensors"))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, MODELS[name]["vocab_size"], (64,), generator=g).tolist()
    started = time.perf_counter()
    try:
        engine = Engine.load(path, expert_budget=budget, quantize=quantize)
    except Exception as e:  # a combination the library refuses: reported, not fatal
        conn.send({"not_run": f"{type(e).__name__}: {e}", "memory": memory_status()})
        return
    out = {"load_s": time.perf_counter() - started, "after_load": memory_status()}
    decode(engine, prompt[:8], 2)  # warm-up (numba compilation), then evict the files again
    out["drop"] = drop_cache(files)
    out["from_disk"] = decode(engine, prompt, new_tokens)
    warm_cache(files)
    out["from_page_cache"] = decode(engine, prompt, new_tokens)
    out["memory"] = memory_status()
    conn.send(out)


def run_cell(name: str, budget, quantize, threads: int, new_tokens: int) -> dict:
    before = drop_cache(sorted(model_dir(name).glob("*.safetensors")))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=cell, args=(child, name, budget, quantize, threads, new_tokens))
    p.start()
    try:
        out = parent.recv()
    except EOFError:
        out = {"not_run": f"the child process died (exit code {p.exitcode}; out of memory?)"}
    p.join()
    return {"budget": budget or "resident", "quantize": quantize or "fp32", "drop_before_load": before, **out}


# ---------------------------------------------------------------- targets, report, main


def fraction(budget: str) -> float:
    return float(budget.rstrip("%")) / 100


def targets_of(cells: list[dict], sizes: dict) -> list[dict]:
    out = []
    for c in cells:
        if "not_run" in c:
            continue
        b, peak = sizes[c["quantize"]], c["memory"]["VmHWM"]
        if c["budget"] == "resident":
            goal = RESIDENT_FACTOR * b["model_MB"] + SLACK_MB
        else:
            goal = b["non_expert_MB"] + fraction(c["budget"]) * b["expert_MB"] + SLACK_MB
        out.append(target(f"peak RSS MB, {c['quantize']}, budget {c['budget']}", peak, round(goal, 1), "<="))
    by = {(c["quantize"], c["budget"]): c for c in cells}
    off, res = by.get(("int4", "25%"), {}), by.get(("int4", "resident"), {})
    if "not_run" in off or "not_run" in res or not off or not res:
        why = off.get("not_run") or res.get("not_run") or "missing"
        out.append({"name": "offloaded int4 25% / resident int4 decode tok/s (page cache)", "value": None,
                    "goal": OFFLOAD_SPEED_GOAL, "direction": ">=", "met": False, "not_run": why})
    else:
        ratio = off["from_page_cache"]["decode_tok_s"] / res["from_page_cache"]["decode_tok_s"]
        out.append(target("offloaded int4 25% / resident int4 decode tok/s (page cache)", ratio, OFFLOAD_SPEED_GOAL))
    return out


def cells_table(cells: list[dict], sizes: dict) -> str:
    rows = []
    for c in cells:
        if "not_run" in c:
            rows.append([c["quantize"], c["budget"], f"not run: {c['not_run']}", "", "", "", "", ""])
            continue
        m = c["memory"]
        rows.append([c["quantize"], c["budget"], f"{c['load_s']:.1f}", f"{c['after_load']['VmRSS']:.0f}",
                     f"{m['VmHWM']:.0f} (anon {m.get('RssAnon', 0):.0f} + file {m.get('RssFile', 0):.0f} now)",
                     f"{c['from_disk']['decode_tok_s']:.2f}", f"{c['from_page_cache']['decode_tok_s']:.2f}",
                     c["drop"]["cached_fraction_after"]])
    return markdown_table(["width", "budget", "load s", "RSS after load MB", "peak RSS (VmHWM) MB", "decode tok/s from disk",
                           "decode tok/s from page cache", "cached fraction after the drop"], rows)


def markdown(result: dict) -> str:
    tgt = markdown_table(["target", "value", "goal", "met"],
                         [[t["name"], t["value"] if t["value"] is not None else f"not run: {t.get('not_run')}",
                           f"{t['direction']} {t['goal']}", t["met"]] for t in result["targets"]])
    sizes = markdown_table(["width", "non-expert MB", "expert MB", "model MB"],
                           [[w, f"{s['non_expert_MB']:.0f}", f"{s['expert_MB']:.0f}", f"{s['model_MB']:.0f}"]
                            for w, s in result["sizes"].items()])
    methods = sorted({c["drop"]["method"] for c in result["cells"] if "drop" in c})
    quick = " (QUICK smoke run: tiny model; not a measurement)" if result["quick"] else ""
    return "\n\n".join([
        f"# Peak memory and decode speed with expert budgets{quick}",
        f"Command: `{result['command']}` ({result['seconds']} s). Model: `{result['model']}` Mixtral-like "
        f"(benchmarks/_cpu_bench.py), {result['threads']} threads, {result['new_tokens']} new tokens per decode. "
        f"Machine: {result['machine']['cpu']}, load average {result['machine']['load_average_1m']} at the end. "
        f"Page cache dropped by: {'; '.join(methods) or '-'}.",
        tgt, sizes, cells_table(result["cells"], result["sizes"]),
        "Peak RSS is the child's VmHWM: anonymous memory plus the file pages it had mapped (safetensors "
        "reads through mmap count while mapped). Goals: budget b: non-expert + b x expert + "
        f"{SLACK_MB} MB; resident: {RESIDENT_FACTOR} x model + {SLACK_MB} MB.",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="tiny model, few tokens; writes nothing unless --out")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results; with --quick: none)")
    args = ap.parse_args()
    name, new_tokens = ("tiny", 4) if args.quick else ("1b", args.new_tokens)
    started = time.perf_counter()
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=model_dir, args=(name,))  # built in a child: the parent stays small
    p.start()
    p.join()
    path = model_dir(name)
    sizes = {q or "fp32": model_bytes(name, path, q) for q in QUANTIZE}
    cells = []
    for q in QUANTIZE:
        for b in (None, "25%") if args.quick else BUDGETS:
            cells.append(run_cell(name, b, q, args.threads, new_tokens))
            c = cells[-1]
            print(f"  {c['quantize']} {c['budget']}: " + (f"not run: {c['not_run']}" if "not_run" in c else
                  f"peak {c['memory']['VmHWM']:.0f} MB, {c['from_page_cache']['decode_tok_s']:.2f} tok/s"), flush=True)
    result = {"targets": targets_of(cells, sizes), "machine": machine_info(), "command": command_line(), "quick": args.quick,
              "model": name, "config": MODELS[name], "threads": args.threads, "new_tokens": new_tokens, "sizes": sizes,
              "cells": cells, "seconds": round(time.perf_counter() - started, 1)}
    md = markdown(result)
    if not args.quick or args.out:
        for out in write_results(NAME, result, md, Path(args.out) if args.out else RESULTS_DIR):
            print(f"wrote {out}")
    print(md)


if __name__ == "__main__":
    main()
