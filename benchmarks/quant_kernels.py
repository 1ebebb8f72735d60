"""Benchmark: quantized-weight matmul kernels against fp32 F.linear on one 4096x4096 matrix.

Claim: moekit's numba kernels (moekit.moe.quant_kernels) multiply a few rows
by an int8 or int4 weight faster than fp32 F.linear multiplies them by the
fp32 weight, because they read 4x / ~6x fewer bytes; and the `dequant`
reference (dequantize, then F.linear) is only worth it once rows are many.
This is the probe behind `auto`'s rule in moekit.moe.quantized
(NUMBA_MAX_ROWS): numba up to that many rows per matrix, dequant above.

Peers, timed interleaved in one process per (threads, rows): fp32 F.linear;
numba int8 (per channel); numba int4 group 32 symmetric and with zero
points; dequant int8 and int4. Rows 1 and 8 (decoding), 64 (where the rule flips);
1 and 2 threads.

    python benchmarks/quant_kernels.py [--reps 15] [--seconds 60]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, interleaved_times, machine_info, markdown_table, median, paired_ratio, target, write_results  # noqa: E402

from moekit.moe import quant_kernels  # noqa: E402
from moekit.moe.quant_format import QuantSpec, dequantize, quantize  # noqa: E402
from moekit.moe.quantized import NUMBA_MAX_ROWS  # noqa: E402

SIZE = 4096
ROWS = (1, 8, 64)
THREADS = (1, 2)
SPECS = {"int8": QuantSpec(8), "int4-g32": QuantSpec(4, 32), "int4-g32-zp": QuantSpec(4, 32, symmetric=False)}

NOTE = """Why the 1-row targets miss here: the machine ran other agents' jobs at a load average of 4-10 on its
2 cores, and the 1-row cells last milliseconds, so a time slice lost to another process dominates them
(fp32 F.linear itself took about 8 ms per call here, against 1.8-2.0 ms measured on a quiet machine in
issue 12). A best-of-15 run of the same kernels in a quieter moment of this session (1 thread,
min rather than median: not this script's measurement, and not paired) gave numba int8 1.5-1.7 ms, numba
int4-g32 5-10 ms and fp32 F.linear 2.8-3.5 ms; the int8 weight-read floor is 16.8 MB / ~19 GB/s = 0.9 ms.
Rerun this script on an idle machine before trusting either set of numbers."""


def peers(x: torch.Tensor, w: torch.Tensor, stored: dict) -> dict:
    N = x.shape[0]
    fns = {"fp32 F.linear": lambda: F.linear(x, w)}
    for name, (spec, t) in stored.items():
        fns[f"numba {name}"] = (lambda spec=spec, t=t: quant_kernels.quantized_matmul(
            x, t["q"], t["scale"], t.get("zero"), spec, [(0, 0, N)]))
    for name in ("int8", "int4-g32"):
        spec, t = stored[name]
        fns[f"dequant {name}"] = (lambda spec=spec, t=t: F.linear(x, dequantize({k: v[0] for k, v in t.items()}, spec)))
    return fns


def run(reps: int, seconds: float) -> dict:
    torch.manual_seed(0)
    w = torch.randn(SIZE, SIZE) / SIZE**0.5
    stored = {name: (spec, quantize(w[None], spec)) for name, spec in SPECS.items()}
    rows_out, old = [], torch.get_num_threads()
    deadline_each = seconds / (len(ROWS) * len(THREADS))
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            for n in ROWS:
                x = torch.randn(n, SIZE)
                fns = peers(x, w, stored)
                for fn in fns.values():  # compile (numba) and warm caches outside the timing
                    fn()
                times = interleaved_times(fns, reps, warmup=2, deadline=time.perf_counter() + deadline_each)
                base = times["fp32 F.linear"]
                for name, ts in times.items():
                    rows_out.append({"threads": threads, "rows": n, "kernel": name, "median_ms": round(1000 * median(ts), 3),
                                     "speedup_vs_fp32": round(paired_ratio(base, ts), 3), "reps": len(ts)})
    finally:
        torch.set_num_threads(old)
    return {"rows": rows_out}


def _get(rows, threads, n, kernel, key="speedup_vs_fp32"):
    return next(r[key] for r in rows if r["threads"] == threads and r["rows"] == n and r["kernel"] == kernel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--seconds", type=float, default=60, help="rough time budget for all cells")
    args = ap.parse_args()
    if not quant_kernels.AVAILABLE:
        raise SystemExit("numba is not installed: nothing to measure")
    res = run(args.reps, args.seconds)
    rows = res["rows"]
    targets = [
        target("numba int8 / fp32 F.linear speedup, 1 row, 2 threads", _get(rows, 2, 1, "numba int8"), 1.5),
        target("numba int4-g32 / fp32 F.linear speedup, 1 row, 2 threads", _get(rows, 2, 1, "numba int4-g32"), 1.5),
        target("numba int8 / fp32 F.linear speedup, 8 rows, 2 threads", _get(rows, 2, 8, "numba int8"), 1.0),
        # auto's rule: up to NUMBA_MAX_ROWS[bits] rows numba must beat the dequant reference
        target(f"numba int8 / dequant int8 speedup at {NUMBA_MAX_ROWS[8]} rows (auto's limit), 2 threads",
               _get(rows, 2, NUMBA_MAX_ROWS[8], "dequant int8", "median_ms") / _get(rows, 2, NUMBA_MAX_ROWS[8], "numba int8", "median_ms"), 1.0),
        target(f"numba int4-g32 / dequant int4-g32 speedup at {NUMBA_MAX_ROWS[4]} rows (auto's limit), 2 threads",
               _get(rows, 2, NUMBA_MAX_ROWS[4], "dequant int4-g32", "median_ms")
               / _get(rows, 2, NUMBA_MAX_ROWS[4], "numba int4-g32", "median_ms"), 1.0),
    ]
    result = {"targets": targets, "machine": machine_info(), "command": command_line(), "size": [SIZE, SIZE],
              "numba": quant_kernels.numba.__version__, "auto_numba_max_rows": {str(k): v for k, v in NUMBA_MAX_ROWS.items()}, **res}
    table = markdown_table(["threads", "rows", "kernel", "median ms", "speedup vs fp32 (paired)", "reps"],
                           [[r["threads"], r["rows"], r["kernel"], r["median_ms"], r["speedup_vs_fp32"], r["reps"]] for r in rows])
    tgt = markdown_table(["target", "value", "goal", "met"],
                         [[t["name"], t["value"], f"{t['direction']} {t['goal']}", t["met"]] for t in targets])
    md = f"""# Quantized-weight kernels vs fp32 F.linear ({SIZE}x{SIZE}, one matrix)

Command: `{result['command']}`. Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores,
load average {result['machine']['load_average_1m']} at the end. **The machine was shared with other
agents' jobs while this ran**, so absolute times are noisy; the speedups are paired per round
(peers interleaved in one process), which cancels most of the drift. A short run
(`--reps {args.reps}`, about {args.seconds:.0f} s).

{tgt}

{table}

Reading (from the table above, 2 threads): at 1 row numba int8 runs at
{_get(rows, 2, 1, "numba int8")}x fp32 F.linear's speed and numba int4-g32 at {_get(rows, 2, 1, "numba int4-g32")}x.
int8 reads 1 byte per weight instead of 4, and its inner loop (int8 -> float, multiply-add) vectorizes, so
it is bound by the weight read. The int4 kernel reads half the bytes of int8 yet takes
{_get(rows, 2, 1, "numba int4-g32", "median_ms")} ms against int8's {_get(rows, 2, 1, "numba int8", "median_ms")} ms:
it is bound by its arithmetic, not by memory: per weight a table lookup of the nibble (a gather, which
does not vectorize like int8's loads) and per group of 32 a 16-step reduction. (Writing that reduction as
`range(base, base + half)` instead of `range(half)` made it another 4-5x slower: LLVM did not vectorize it.)
A faster int4 needs SIMD nibble unpacking (a C++/ISPC kernel, or llama.cpp-style int8 activations with
integer dot products), left for later.

{NOTE}
`dequant` pays a full dequantization of the 4096x4096 weight per call, then a BLAS matmul that is
reused across rows, so it only pays off at many rows. `auto` (moekit.moe.quantized) uses numba up to
{NUMBA_MAX_ROWS[8]} rows per matrix for int8 and {NUMBA_MAX_ROWS[4]} for int4, dequant above (the
"auto's limit" targets check that numba beats dequant at those limits).
"""
    write_results("quant_kernels", result, md)
    print(md)


if __name__ == "__main__":
    main()
