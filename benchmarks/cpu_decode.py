"""Benchmark: moekit against llama.cpp on CPU, batch-1 decode and prefill, on the same weights, quiet and loaded.

Claim (issue 23 targets): at every format (moekit fp32 / int8 / int4-g32 against llama.cpp's F32 / Q8_0 /
Q4_0 on the GGUF file moekit's own writer exports from the same weights, and both sides on one Q4_K_M file
made by llama.cpp's own quantizer, which moekit runs in its own blocks), both models (the 100M Mixtral-like
of benchmarks/generate.py and a ~1B one, random weights, built once into a cache under /tmp) and 1 and 2
threads, moekit decodes at batch 1 at least as fast as llama.cpp's best build here (AVX-512 + VNNI, AMX off)
and prefills 64 and 512 tokens at least as fast; with one busy process beside it, decode at the default
thread count keeps at least half its quiet speed and stays at least as fast as llama.cpp under the same
load, as it does with two busy processes; the 1B model's int4 / fp32 decode ratio is at least llama.cpp's
Q4_0 / F32 ratio; on the Q4_K_M file, the two sides' logits agree on the top token at >= 85% of prompt
positions with mean cosine >= 0.98; the validation loss of a moekit model trained on real text rises by at
most 0.3% at int8 and 2% at int4-g32.

How: each side lives in its own child process (spawned, so its peak RSS, VmHWM, is its own). Per (model,
format) every side loads its weights; per thread count, rounds rotate the side that goes first and each
side, in turn, generates N tokens from a 64-token prompt (prefill time = to the first token; decode = the
N-1 further steps) and prefills a 512-token prompt. Ratios are paired per round. The busy cells run the
same rounds (decode only, default 2 threads) while 1 or 2 other processes spin `while True: pass`.
moekit quantizes what the GGUF writer quantizes (scope="all": experts, attention, head; routers, norms and
the embedding stay fp32). llama.cpp: llama-cpp-python built from source with the flags in
LLAMA_BUILD_FLAGS (benchmarks/_cpu_bench.py); the AVX2 build is a second peer row (--llama-avx2 DIR, a
`pip install --target DIR` of it). The weight-read floor (active bytes per token / measured copy
bandwidth) says how close each side comes to the memory bound.

    python benchmarks/cpu_decode.py --llama-avx2 /tmp/llama/avx2          # both models, 3 rounds
    python benchmarks/cpu_decode.py --models 100m --rounds 3
    python benchmarks/cpu_decode.py --quick           # tiny model, 1 round, ~2 min; writes nothing unless --out DIR
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from _common import RESULTS_DIR, command_line, machine_info, median, per_round_ratios, spread, target, write_results  # noqa: E402
from _cpu_bench import (  # noqa: E402
    LLAMA_BUILD_FLAGS, MODELS, WIDTHS, BusyLoops, Worker, active_bytes, bandwidth_gbs, gguf_path, model_dir,
)
from _cpu_quality import logit_agreement, run_quality  # noqa: E402
from _cpu_report import markdown  # noqa: E402

NAME = "cpu_decode"
DECODE_GOAL, PREFILL_GOAL, BUSY_KEEP_GOAL = 1.0, 1.0, 0.5
QUALITY_GOALS = {"int8": 0.3, "int4-g32": 2.0}  # percent val-loss increase (quant_quality.py's widths)
TOP1_GOAL, COSINE_GOAL = 0.85, 0.98
PEER = "llama.cpp"  # the AVX-512 build: the targets' peer


# ---------------------------------------------------------------- the sides (run in child processes)


def moekit_side(name: str, width: str, _site=None):
    from moekit.infer import Engine, SamplingConfig
    from moekit.quantize import quantize_model

    torch.set_num_threads(1)
    started = time.perf_counter()
    options = WIDTHS[width][1]
    if options == "gguf":
        engine = Engine.load(gguf_path(name, WIDTHS[width][0]))
    else:
        engine = Engine.load(model_dir(name))
        if options:
            engine = Engine(quantize_model(engine.model, **options))
    load_s = time.perf_counter() - started
    steps = _time_steps(engine)

    @torch.inference_mode()
    def handle(kind: str, threads: int, prompt: list[int], new_tokens: int) -> dict:
        torch.set_num_threads(threads)
        if kind == "logits":
            return {"logits": engine.model(torch.tensor([prompt])).logits[0].float().numpy()}
        steps.clear()
        out = engine.generate_ids([prompt], SamplingConfig(max_new_tokens=new_tokens, stop_token_ids=[]))[0].token_ids
        st, decode = engine.last_stats, steps[1:]  # steps[0]: the prefill
        return {"prefill_s": st["prefill_s"], "decode_s": st["decode_s"], "steps": len(out) - 1, "tokens": out,
                "step_s": sum(a for a, _ in decode), "kernel_s": sum(b for _, b in decode)}

    from moekit.moe import native

    return {"load_s": load_s, "native_isa": native.isa()}, handle


def _time_steps(engine) -> list:
    """Wraps the engine's model step: each call's (seconds, seconds inside the native kernels) goes to the list."""
    from moekit.moe import native

    log, step = [], engine._step

    def timed(*args, **kwargs):
        k0, t0 = native.kernel_time()[1], time.perf_counter()
        out = step(*args, **kwargs)
        log.append((time.perf_counter() - t0, native.kernel_time()[1] - k0))
        return out

    engine._step = timed
    return log


def llama_side(name: str, width: str, site: str | None = None):
    if site:  # another build of llama-cpp-python (pip install --target DIR)
        sys.path.insert(0, site)
    import llama_cpp

    path, state = gguf_path(name, WIDTHS[width][0]), {}
    started = time.perf_counter()

    def llm_for(threads: int, logits_all: bool = False):
        if state.get("key") != (threads, logits_all):  # one context at a time (two would map the file twice)
            state.pop("llm", None)
            state["llm"] = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                                           logits_all=logits_all, verbose=False)
            state["key"] = (threads, logits_all)
        return state["llm"]

    llm_for(1)
    load_s = time.perf_counter() - started

    def handle(kind: str, threads: int, prompt: list[int], new_tokens: int) -> dict:
        if kind == "logits":
            llm = llm_for(threads, logits_all=True)
            llm.reset()
            llm.eval(prompt)
            return {"logits": llm.scores[: len(prompt)].copy()}
        llm = llm_for(threads)
        llm.reset()  # no prefix reuse from the previous request
        out, t0 = [], time.perf_counter()
        for tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            if not out:
                t1 = time.perf_counter()
            out.append(int(tok))
            if len(out) == new_tokens:
                break
        return {"prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1, "steps": len(out) - 1, "tokens": out}

    system = llama_cpp.llama_print_system_info()  # the CPU features this build uses (AVX512 = 1, AMX absent, ...)
    return {"load_s": load_s, "llama_cpp_python": llama_cpp.__version__, "module": llama_cpp.__file__,
            "system_info": system.decode() if isinstance(system, bytes) else str(system)}, handle


def sides(llama_avx2: str | None) -> dict:
    """side name -> (loader, site dir)."""
    out = {"moekit": (moekit_side, None), PEER: (llama_side, None)}
    if llama_avx2:
        out["llama.cpp-avx2"] = (llama_side, llama_avx2)
    return out


# ---------------------------------------------------------------- timing


def prompts(name: str, lengths: tuple[int, ...]) -> dict[int, list[int]]:
    g = torch.Generator().manual_seed(1)
    V = MODELS[name]["vocab_size"]
    return {n: torch.randint(10, V, (n,), generator=g).tolist() for n in lengths}


def prepare(name: str) -> None:
    """Builds the model directory and its GGUF files (run in a child: the parent stays small)."""
    from moekit.infer import Engine

    model = Engine.load(model_dir(name)).model
    for gguf_type, _ in WIDTHS.values():
        gguf_path(name, gguf_type, model)


def time_cell(workers: dict, threads: int, rounds: int, ps: dict, new_tokens: int, prefill: bool = True) -> dict:
    """Per side: per-round decode tok/s and prefill tok/s at each prompt length (paired rounds)."""
    short, long_ = min(ps), max(ps)
    runs = {s: {"decode": [], **{f"prefill{n}": [] for n in ps}, "tokens": None} for s in workers}
    for w in workers.values():  # warm-up (kernels, llama.cpp repacking, caches, the thread tuner)
        w.call("run", threads, ps[short], 8)
    order = list(workers)
    for r in range(rounds):
        for side in order[r % len(order):] + order[: r % len(order)]:
            w, rec = workers[side], runs[side]
            got = w.call("run", threads, ps[short], new_tokens)
            rec["decode"].append(got["steps"] / got["decode_s"])
            if "kernel_s" in got:  # moekit: per decode step, time in its model step and inside the native kernels
                rec.setdefault("step_ms", []).append(1000 * got["step_s"] / max(got["steps"], 1))
                rec.setdefault("kernel_ms", []).append(1000 * got["kernel_s"] / max(got["steps"], 1))
            rec[f"prefill{short}"].append(short / got["prefill_s"])
            rec["tokens"] = rec["tokens"] or got["tokens"]
            if prefill and long_ != short:
                got = w.call("run", threads, ps[long_], 1)
                rec[f"prefill{long_}"].append(long_ / got["prefill_s"])
    return runs


def _ratios(runs: dict, keys) -> dict:
    """moekit / each peer, per round, for each key (decode, prefill64, ...)."""
    out = {}
    for peer in (s for s in runs if s != "moekit"):
        for k in keys:
            if runs["moekit"][k] and runs[peer][k]:
                out[f"{k}_ratio" + ("" if peer == PEER else f"_vs_{peer}")] = spread(per_round_ratios(runs["moekit"][k], runs[peer][k]))
    return out


def bench_width(name: str, width: str, args, lengths, side_map: dict) -> dict:
    ps = prompts(name, lengths)
    workers = {side: Worker(fn, name, width, site) for side, (fn, site) in side_map.items()}
    cells, busy, logits = [], [], None
    try:
        for threads in (1, 2):
            runs = time_cell(workers, threads, args.rounds, ps, args.new_tokens)
            cell = {"threads": threads, **runs, **_ratios(runs, ["decode", *[f"prefill{n}" for n in ps]])}
            cell["greedy_agreement"] = sum(a == b for a, b in zip(runs["moekit"]["tokens"], runs[PEER]["tokens"])) / len(runs["moekit"]["tokens"])
            cells.append(cell)
            print(f"  {name} {width} {threads}t: decode moekit {median(runs['moekit']['decode']):.1f} {PEER} "
                  f"{median(runs[PEER]['decode']):.1f} tok/s (ratio {cell['decode_ratio']['median']:.2f})", flush=True)
        pair = {s: workers[s] for s in ("moekit", PEER)}
        for k in args.busy:
            with BusyLoops(k):
                runs = time_cell(pair, 2, args.rounds, {min(ps): ps[min(ps)]}, args.new_tokens, prefill=False)
            busy.append({"busy_processes": k, "threads": 2, **runs, **_ratios(runs, ["decode"])})
            print(f"  {name} {width} 2t + {k} busy: decode moekit {median(runs['moekit']['decode']):.1f} {PEER} "
                  f"{median(runs[PEER]['decode']):.1f} tok/s", flush=True)
        if WIDTHS[width][1] == "gguf":
            logits = logit_agreement(*[[workers[s].call("logits", 1, p, 0)["logits"] for p in _logit_prompts(name)]
                                       for s in ("moekit", PEER)])
    finally:
        ready = {side: w.ready for side, w in workers.items()}
        memory = {side: w.close() for side, w in workers.items()}
    return {"model": name, "width": width, "gguf_type": WIDTHS[width][0], "cells": cells, "busy": busy, "logits": logits,
            "ready": ready, "memory": memory,
            "active_bytes": {"moekit": active_bytes(name, width), **{s: active_bytes(name, WIDTHS[width][0]) for s in side_map if s != "moekit"}}}


def _logit_prompts(name: str, n: int = 4, length: int = 64) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(10, MODELS[name]["vocab_size"], (length,), generator=g).tolist() for _ in range(n)]


# ---------------------------------------------------------------- targets and main


def targets_of(widths: list[dict], qual: dict) -> list[dict]:
    out = []
    for b in widths:
        label = f"{b['model']} {b['width']} vs {b['gguf_type']}"
        for c in b["cells"]:
            t = f"{c['threads']} thread{'s' if c['threads'] > 1 else ''}"
            out.append(target(f"decode tok/s moekit / {PEER}, {label}, {t}", c["decode_ratio"]["median"], DECODE_GOAL))
            out += [target(f"prefill tok/s moekit / {PEER}, {label}, {k[7:-6]} tokens, {t}", c[k]["median"], PREFILL_GOAL)
                    for k in c if k.startswith("prefill") and k.endswith("_ratio")]
        quiet2 = next(c for c in b["cells"] if c["threads"] == 2)
        for bc in b["busy"]:
            k = bc["busy_processes"]
            if k == 1:
                out.append(target(f"moekit decode with 1 busy process / quiet, {label}, 2 threads (default)",
                                  median(bc["moekit"]["decode"]) / median(quiet2["moekit"]["decode"]), BUSY_KEEP_GOAL))
            out.append(target(f"decode tok/s moekit / {PEER} with {k} busy process{'es' if k > 1 else ''}, {label}",
                              bc["decode_ratio"]["median"], DECODE_GOAL))
        if b["logits"]:
            out.append(target(f"top-1 agreement with {PEER}'s logits, {label}", b["logits"]["top1_agreement"], TOP1_GOAL))
            out.append(target(f"mean cosine with {PEER}'s logits, {label}", b["logits"]["mean_cosine"], COSINE_GOAL))
    out += _int4_over_fp32(widths)
    for w, goal in QUALITY_GOALS.items():
        out.append(target(f"val-loss increase vs fp32 in percent, {w} (experts)", 100 * qual["losses"][w]["increase"], goal, "<="))
    return out


def _int4_over_fp32(widths: list[dict]) -> list[dict]:
    """The largest model's int4 / fp32 decode speed, moekit's against llama.cpp's Q4_0 / F32 in the same run."""
    by = {(b["model"], b["width"]): b for b in widths}
    big = max((b["model"] for b in widths), key=lambda m: list(MODELS).index(m))
    if (big, "int4") not in by or (big, "fp32") not in by:
        return []
    out = []
    for c4, c32 in zip(by[big, "int4"]["cells"], by[big, "fp32"]["cells"]):
        mk = median(c4["moekit"]["decode"]) / median(c32["moekit"]["decode"])
        ll = median(c4[PEER]["decode"]) / median(c32[PEER]["decode"])
        out.append(target(f"int4 / fp32 decode tok/s, {big}, {c4['threads']} thread(s): moekit's over {PEER}'s Q4_0 / F32 "
                          f"({ll:.2f})", mk / ll, 1.0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=[m for m in MODELS if m != "tiny"], default=["100m", "1b"])
    ap.add_argument("--widths", nargs="+", choices=list(WIDTHS), default=list(WIDTHS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--busy", type=int, nargs="*", default=[1, 2], help="busy-process counts of the loaded cells (none: skip)")
    ap.add_argument("--llama-avx2", default=None, help="a `pip install --target DIR` of llama-cpp-python's AVX2 build (a second peer row)")
    ap.add_argument("--quality-steps", type=int, default=400, help="training steps of the quality model (tiny preset)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 round, short training; writes nothing unless --out")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results; with --quick: none)")
    args = ap.parse_args()
    models, lengths = (["tiny"], (64, 512)) if args.quick else (args.models, (64, 512))
    if args.quick:
        args.rounds, args.new_tokens = 1, 8
    steps, batches = (10, 1) if args.quick else (args.quality_steps, 8)
    started = time.perf_counter()
    ctx = mp.get_context("spawn")
    for name in models:
        p = ctx.Process(target=prepare, args=(name,))
        p.start()
        p.join()
        if p.exitcode:
            raise SystemExit(f"building {name} failed (exit code {p.exitcode})")
    bandwidth = {t: bandwidth_gbs(t) for t in (1, 2)}
    side_map = sides(args.llama_avx2)
    widths = [bench_width(name, w, args, lengths, side_map) for name in models for w in args.widths]
    qual = run_quality(steps, batches, Path("/tmp/moekit_bench_cache") / f"quality-tiny-{steps}")
    result = {"targets": targets_of(widths, qual), "machine": machine_info(), "command": command_line(), "quick": args.quick,
              "peers": {s: {"build_cmake_args": LLAMA_BUILD_FLAGS[s], **{k: widths[0]["ready"][s].get(k) for k in
                                                                          ("llama_cpp_python", "system_info", "module")}}
                        for s in side_map if s != "moekit"},
              "native_isa": widths[0]["ready"]["moekit"].get("native_isa"),
              "models": {m: MODELS[m] for m in models}, "rounds": args.rounds, "new_tokens": args.new_tokens,
              "copy_bandwidth_gbs": bandwidth, "widths": widths, "quality": qual,
              "seconds": round(time.perf_counter() - started, 1)}
    md = markdown(result)
    if not args.quick or args.out:
        for path in write_results(NAME, result, md, Path(args.out) if args.out else RESULTS_DIR):
            print(f"wrote {path}")
    print(md)


if __name__ == "__main__":
    main()
