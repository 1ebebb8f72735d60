"""Benchmark: quantized-weight matmul kernels against fp32 F.linear on one 4096x4096 matrix.

Claim: moekit's numba kernels (moekit.moe.quant_kernels) multiply a few rows
by an int8 or int4 weight faster than fp32 F.linear multiplies them by the
fp32 weight, because they read 4x / ~6x fewer bytes; int4 faster than int8 at
one row (it reads about 0.6x int8's bytes); and the `dequant` reference
(dequantize, then F.linear) is only worth it once rows are many.
This is the probe behind `auto`'s rule in moekit.moe.quantized
(NUMBA_MAX_ROWS): numba up to that many rows per matrix, dequant above.

Peers, timed interleaved in one process per (threads, rows): fp32 F.linear;
numba int8 (per channel); numba int4 group 32 symmetric and with zero
points; dequant int8 and int4. Rows 1 and 8 (decoding), 32 and 64 (where the rule flips);
1 and 2 threads. Each call takes the next of COPIES different matrices, so the
weights come from memory, not from the 32 MB L3 cache (one int4 4096x4096
matrix is 10 MB), as they do in a model's decode step.

    python benchmarks/quant_kernels.py [--reps 15] [--seconds 60]
    python benchmarks/quant_kernels.py --quick     # a smoke run, a few seconds per cell; writes nothing
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

from _cpu_bench import bandwidth_gbs  # noqa: E402

from moekit.moe import native, quant_kernels  # noqa: E402
from moekit.moe.quant_format import QuantSpec, dequantize, quantize  # noqa: E402
from moekit.moe.quantized import NUMBA_MAX_ROWS  # noqa: E402

SIZE = 4096
COPIES = 4  # distinct matrices cycled through (4 x 10 MB int4 > the L3 cache)
ROWS = (1, 8, 32, 64, 512)  # 64: numba's limit under auto (NUMBA_MAX_ROWS); 512: a long prompt's prefill
THREADS = (1, 2)
SPECS = {"int8": QuantSpec(8), "int4-g32": QuantSpec(4, 32), "int4-g32-zp": QuantSpec(4, 32, symmetric=False)}

NOTE = """Noise: on a shared machine (see the load average above) a 1-row cell lasts about a millisecond, so
one time slice lost to another process dominates its round; pairing cancels slow drift, not that. Rerun
on an idle machine before trusting the 1-row figures."""


def peers(x: torch.Tensor, ws: list[torch.Tensor], stored: dict) -> dict:
    """Each peer multiplies x by the next of the COPIES matrices on every call."""
    N, turn = x.shape[0], {}

    def nxt(name):
        turn[name] = (turn.get(name, -1) + 1) % COPIES
        return turn[name]

    fns = {"fp32 F.linear": lambda: F.linear(x, ws[nxt("fp32")])}
    for name, (spec, t) in stored.items():
        fns[f"numba {name}"] = (lambda name=name, spec=spec, t=t: quant_kernels.quantized_matmul(
            x, t["q"], t["scale"], t.get("zero"), spec, [(nxt(name), 0, N)]))
    for name in ("int8", "int4-g32"):
        spec, t = stored[name]
        for isa in native.supported_isas() if N == 1 else native.supported_isas()[-1:]:  # every build at one row
            records = [native.moekit_weight(t["q"][i : i + 1], t["scale"][i : i + 1], None, spec) for i in range(COPIES)]
            fns[f"native {isa} {name}"] = (lambda name=name, isa=isa, records=records: _native_call(isa, x, records[nxt(f"n{isa}{name}")]))
        fns[f"dequant {name}"] = (lambda name=name, spec=spec, t=t: F.linear(
            x, dequantize({k: v[nxt("dq" + name)] for k, v in t.items()}, spec)))
    return fns


def _native_call(isa: str, x: torch.Tensor, record: tuple) -> torch.Tensor:
    with native.force_isa(isa):
        return native.matmul(x, record, None)


def run(reps: int, seconds: float, size: int = SIZE) -> dict:
    torch.manual_seed(0)
    w = torch.randn(COPIES, size, size) / size**0.5
    stored = {name: (spec, quantize(w, spec)) for name, spec in SPECS.items()}
    ws = list(w)
    rows_out, old = [], torch.get_num_threads()
    deadline_each = seconds / (len(ROWS) * len(THREADS))
    try:
        for threads in THREADS:
            torch.set_num_threads(threads)
            for n in ROWS:
                x = torch.randn(n, size)
                fns = peers(x, ws, stored)
                if n > 64:  # numba's kernels are for decoding (auto never runs them here)
                    fns = {k: f for k, f in fns.items() if not k.startswith("numba")}
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


def read_gbs(mb: int = 512, reps: int = 5) -> float:
    """GB/s one thread reads (a large fp32 tensor's sum: bytes read, nothing written): the bound a GEMV can reach."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.ones(mb * 2**20 // 4)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a.sum()
            best = min(best, time.perf_counter() - t)
        return a.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(old)


def native_gbs(rows, kernel: str, size: int) -> float:
    """Weight bytes read per second by `kernel` at 1 row, 1 thread (int8: codes + a scale per row; int4-g32: + a scale per 32)."""
    nbytes = size * size + 4 * size if kernel.endswith("int8") else size * size // 2 + 4 * size * size // 32
    return nbytes / (_get(rows, 1, 1, kernel, "median_ms") / 1000) / 1e9


def native_targets(rows, copy_gbs: float, size: int) -> list[dict]:
    """The issue-23 kernel goals: share of the measured copy bandwidth, and native against numba and dequant."""
    if not native.AVAILABLE:
        return []
    best = native.supported_isas()[-1]
    out = [target(f"native {best} int8, 1 row, 1 thread: weight GB/s / copy GB/s", native_gbs(rows, f"native {best} int8", size) / copy_gbs, 1.0),
           target(f"native {best} int4-g32, 1 row, 1 thread: weight GB/s / copy GB/s", native_gbs(rows, f"native {best} int4-g32", size) / copy_gbs, 0.8)]
    if "avx2" in native.supported_isas():
        out.append(target("native avx2 int8, 1 row, 1 thread: weight GB/s / copy GB/s", native_gbs(rows, "native avx2 int8", size) / copy_gbs, 0.8))
    for name in ("int8", "int4-g32"):
        out.append(target(f"native {best} {name} / numba {name} speedup, 1 row, 1 thread",
                          _get(rows, 1, 1, f"numba {name}", "median_ms") / _get(rows, 1, 1, f"native {best} {name}", "median_ms"), 1.0))
        for n in (64, 512):
            out.append(target(f"native {best} {name} / dequant {name} speedup, {n} rows, 2 threads",
                              _get(rows, 2, n, f"dequant {name}", "median_ms") / _get(rows, 2, n, f"native {best} {name}", "median_ms"), 1.0))
    return out


def _get(rows, threads, n, kernel, key="speedup_vs_fp32"):
    return next(r[key] for r in rows if r["threads"] == threads and r["rows"] == n and r["kernel"] == kernel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--seconds", type=float, default=60, help="rough time budget for all cells")
    ap.add_argument("--quick", action="store_true", help="1024x1024, 3 reps: a smoke run that writes nothing")
    args = ap.parse_args()
    if not quant_kernels.AVAILABLE:
        raise SystemExit("numba is not installed: nothing to measure")
    if args.quick:
        args.reps, args.seconds = 3, 5
    size = 1024 if args.quick else SIZE
    res = run(args.reps, args.seconds, size)
    res["copy_bandwidth_gbs"] = {t: round(bandwidth_gbs(t), 2) for t in THREADS}
    res["read_bandwidth_gbs_1_thread"] = round(read_gbs(), 2)
    rows = res["rows"]
    targets = [
        target("numba int8 / fp32 F.linear speedup, 1 row, 2 threads", _get(rows, 2, 1, "numba int8"), 1.5),
        target("numba int4-g32 / fp32 F.linear speedup, 1 row, 2 threads", _get(rows, 2, 1, "numba int4-g32"), 1.5),
        target("numba int8 / fp32 F.linear speedup, 8 rows, 2 threads", _get(rows, 2, 8, "numba int8"), 1.0),
        *[target(f"numba int4-g32 / numba int8 speedup, 1 row, {t} thread(s)",
                 _get(rows, t, 1, "numba int8", "median_ms") / _get(rows, t, 1, "numba int4-g32", "median_ms"), 1.0)
          for t in THREADS],
        # auto's rule: up to NUMBA_MAX_ROWS[bits] rows numba must beat the dequant reference
        target(f"numba int8 / dequant int8 speedup at {NUMBA_MAX_ROWS[8]} rows (auto's limit), 2 threads",
               _get(rows, 2, NUMBA_MAX_ROWS[8], "dequant int8", "median_ms") / _get(rows, 2, NUMBA_MAX_ROWS[8], "numba int8", "median_ms"), 1.0),
        target(f"numba int4-g32 / dequant int4-g32 speedup at {NUMBA_MAX_ROWS[4]} rows (auto's limit), 2 threads",
               _get(rows, 2, NUMBA_MAX_ROWS[4], "dequant int4-g32", "median_ms")
               / _get(rows, 2, NUMBA_MAX_ROWS[4], "numba int4-g32", "median_ms"), 1.0),
        *native_targets(rows, res["copy_bandwidth_gbs"][1], size),
    ]
    result = {"targets": targets, "machine": machine_info(), "command": command_line(), "size": [size, size], "copies": COPIES,
              "numba": quant_kernels.numba.__version__, "auto_numba_max_rows": {str(k): v for k, v in NUMBA_MAX_ROWS.items()}, **res}
    table = markdown_table(["threads", "rows", "kernel", "median ms", "speedup vs fp32 (paired)", "reps"],
                           [[r["threads"], r["rows"], r["kernel"], r["median_ms"], r["speedup_vs_fp32"], r["reps"]] for r in rows])
    tgt = markdown_table(["target", "value", "goal", "met"],
                         [[t["name"], t["value"], f"{t['direction']} {t['goal']}", t["met"]] for t in targets])
    md = f"""# Quantized-weight kernels vs fp32 F.linear ({size}x{size}, {COPIES} matrices in turn)

Command: `{result['command']}`. Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores,
load average {result['machine']['load_average_1m']} at the end. **The machine was shared with other
agents' jobs while this ran**, so absolute times are noisy; the speedups are paired per round
(peers interleaved in one process), which cancels most of the drift. A short run
(`--reps {args.reps}`, about {args.seconds:.0f} s).

{tgt}

{table}

Reading (from the table above, 2 threads): at 1 row numba int8 runs at
{_get(rows, 2, 1, "numba int8")}x fp32 F.linear's speed and numba int4-g32 at {_get(rows, 2, 1, "numba int4-g32")}x.
int8 reads 1 byte per weight instead of 4, int4-g32 0.625 (codes + one fp32 scale per 32); both inner
loops vectorize (int8: widen, convert, multiply-add; int4: 16 bytes of four output channels per step,
nibbles by mask and shift on int32 lanes, convert, scale, accumulate lane-wise, one reduction per channel
at the end). int4-g32 takes {_get(rows, 2, 1, "numba int4-g32", "median_ms")} ms against int8's
{_get(rows, 2, 1, "numba int8", "median_ms")} ms at 1 row, 2 threads. The kernel before this one (a 256-entry
nibble table, a gather, and one reduction per group of 32) took 5-10x int8's time.

Native kernels (the C extension; every instruction-set build at 1 row): weight GB/s at 1 row, 1 thread,
against the copy bandwidth (read + write bytes counted, {result['copy_bandwidth_gbs'][1]} GB/s) and against what one thread
reads when it only reads (a large fp32 sum: {result['read_bandwidth_gbs_1_thread']} GB/s): int8 (best build)
{native_gbs(rows, f"native {native.supported_isas()[-1]} int8", size):.1f} GB/s, int4-g32
{native_gbs(rows, f"native {native.supported_isas()[-1]} int4-g32", size):.1f} GB/s, AVX2 int8
{native_gbs(rows, "native avx2 int8", size) if "avx2" in native.supported_isas() else float("nan"):.1f} GB/s.

{NOTE}
`dequant` pays a full dequantization of the 4096x4096 weight per call, then a BLAS matmul that is
reused across rows, so it only pays off at many rows. `auto` (moekit.moe.quantized) uses numba up to
{NUMBA_MAX_ROWS[8]} rows per matrix for int8 and {NUMBA_MAX_ROWS[4]} for int4, dequant above (the
"auto's limit" targets check that numba beats dequant at those limits).
"""
    if args.quick:
        print("(--quick: nothing written)")
    else:
        write_results("quant_kernels", result, md)
    print(md)


if __name__ == "__main__":
    main()
