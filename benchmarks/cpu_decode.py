"""Benchmark: moekit against llama.cpp on CPU, batch-1 decode and prefill, on the same weights.

Claim (issue 12 targets): at every width (moekit fp32 / int8 / int4-g32 against llama.cpp's F32 / Q8_0 /
Q4_0 on the GGUF file moekit's own writer exports from the same weights), both models (the 100M
Mixtral-like of benchmarks/generate.py and a ~1B Mixtral-like one, random weights, built once into a
cache under /tmp) and 1 and 2 threads, moekit decodes at batch 1 at least as fast as llama.cpp
(tok/s ratio >= 1.0) and prefills 64 and 512 tokens at least as fast; moekit int4 decodes the ~1B model
at least 5x faster than moekit fp32; the validation loss of a moekit model trained on real text rises by
at most 0.3% at int8 and 2% at int4-g32 (benchmarks/quant_quality.py's measurement, rerun here).

How: each side lives in its own child process (spawned, so its peak RSS, VmHWM, is its own). Per
(model, width) both children load their weights; per thread count, rounds alternate the side that goes
first and each side, in turn, generates N tokens from a 64-token prompt (prefill time = to the first
token; decode = the N-1 further steps) and prefills a 512-token prompt. Ratios are paired per round.
moekit quantizes what the GGUF writer quantizes (scope="all": experts, attention, head; routers, norms and
the embedding stay fp32). llama.cpp: llama-cpp-python built from source with the flags in
LLAMA_BUILD_FLAGS (benchmarks/_cpu_bench.py). The weight-read floor (active bytes per token / measured copy
bandwidth) says how close each side comes to the memory bound.

    python benchmarks/cpu_decode.py                   # both models, 5 rounds (~30-40 min on 2 cores)
    python benchmarks/cpu_decode.py --models 100m --rounds 3
    python benchmarks/cpu_decode.py --quick           # tiny model, 1 round, ~1 min; writes nothing unless --out DIR
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
    LLAMA_BUILD_FLAGS, MODELS, WIDTHS, Worker, active_bytes, bandwidth_gbs, gguf_path, model_dir,
)
from _cpu_report import markdown  # noqa: E402

NAME = "cpu_decode"
DECODE_GOAL, PREFILL_GOAL, INT4_OVER_FP32_GOAL = 1.0, 1.0, 5.0
QUALITY_GOALS = {"int8": 0.3, "int4-g32": 2.0}  # percent val-loss increase (quant_quality.py's widths)


# ---------------------------------------------------------------- the two sides (run in child processes)


def moekit_side(name: str, width: str):
    from moekit.infer import Engine, SamplingConfig
    from moekit.quantize import quantize_model

    torch.set_num_threads(1)
    started = time.perf_counter()
    engine = Engine.load(model_dir(name))
    options = WIDTHS[width][1]
    if options:
        engine = Engine(quantize_model(engine.model, **options))
    load_s = time.perf_counter() - started

    @torch.no_grad()
    def handle(_, threads: int, prompt: list[int], new_tokens: int) -> dict:
        torch.set_num_threads(threads)
        out = engine.generate_ids([prompt], SamplingConfig(max_new_tokens=new_tokens, stop_token_ids=[]))[0].token_ids
        st = engine.last_stats
        return {"prefill_s": st["prefill_s"], "decode_s": st["decode_s"], "steps": len(out) - 1, "tokens": out}

    return {"load_s": load_s}, handle


def llama_side(name: str, width: str):
    import llama_cpp

    path, state = gguf_path(name, WIDTHS[width][0]), {}
    started = time.perf_counter()

    def llm_for(threads: int):
        if state.get("threads") != threads:  # one context at a time (two would map the file twice)
            state.pop("llm", None)
            state["llm"] = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_threads=threads,
                                           n_threads_batch=threads, verbose=False)
            state["threads"] = threads
        return state["llm"]

    llm_for(1)
    load_s = time.perf_counter() - started

    def handle(_, threads: int, prompt: list[int], new_tokens: int) -> dict:
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

    system = llama_cpp.llama_print_system_info()  # the CPU features this build uses (AVX2 = 1, AMX absent, ...)
    return {"load_s": load_s, "llama_cpp_python": llama_cpp.__version__,
            "system_info": system.decode() if isinstance(system, bytes) else str(system)}, handle


SIDES = {"moekit": moekit_side, "llama.cpp": llama_side}


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


def time_cell(workers: dict, threads: int, rounds: int, ps: dict, new_tokens: int) -> dict:
    """Per side: per-round decode tok/s and prefill tok/s at each prompt length (paired rounds)."""
    short, long_ = min(ps), max(ps)
    runs = {s: {"decode": [], **{f"prefill{n}": [] for n in ps}, "tokens": None} for s in workers}
    for w in workers.values():  # warm-up (numba compilation, llama.cpp repacking, caches)
        w.call("run", threads, ps[short], 4)
    order = list(workers)
    for r in range(rounds):
        for side in order[r % 2:] + order[: r % 2]:
            w, rec = workers[side], runs[side]
            got = w.call("run", threads, ps[short], new_tokens)
            rec["decode"].append(got["steps"] / got["decode_s"])
            rec[f"prefill{short}"].append(short / got["prefill_s"])
            rec["tokens"] = rec["tokens"] or got["tokens"]
            if long_ != short:
                got = w.call("run", threads, ps[long_], 1)
                rec[f"prefill{long_}"].append(long_ / got["prefill_s"])
    return runs


def bench_width(name: str, width: str, threads_list, rounds: int, new_tokens: int, lengths) -> dict:
    ps = prompts(name, lengths)
    workers = {side: Worker(fn, name, width) for side, fn in SIDES.items()}
    cells = []
    try:
        for threads in threads_list:
            runs = time_cell(workers, threads, rounds, ps, new_tokens)
            mk, ll = runs["moekit"], runs["llama.cpp"]
            cell = {"threads": threads, "moekit": mk, "llama.cpp": ll,
                    "decode_ratio": spread(per_round_ratios(mk["decode"], ll["decode"])),
                    "greedy_agreement": sum(a == b for a, b in zip(mk["tokens"], ll["tokens"])) / len(mk["tokens"])}
            for n in ps:
                cell[f"prefill{n}_ratio"] = spread(per_round_ratios(mk[f"prefill{n}"], ll[f"prefill{n}"]))
            cells.append(cell)
            print(f"  {name} {width} {threads}t: decode moekit {median(mk['decode']):.1f} llama.cpp "
                  f"{median(ll['decode']):.1f} tok/s (ratio {cell['decode_ratio']['median']:.2f})", flush=True)
    finally:
        ready = {side: w.ready for side, w in workers.items()}
        memory = {side: w.close() for side, w in workers.items()}
    return {"model": name, "width": width, "gguf_type": WIDTHS[width][0], "cells": cells, "ready": ready, "memory": memory,
            "active_bytes": {"moekit": active_bytes(name, width), "llama.cpp": active_bytes(name, WIDTHS[width][0])}}


# ---------------------------------------------------------------- quality (a model trained on real text)


def quality(steps: int, batches: int, out: Path, prompt_len: int = 32, new_tokens: int = 32, n_prompts: int = 4) -> dict:
    """quant_quality.py's val losses (experts scope) plus greedy-token agreement with fp32 per width (scope all)."""
    from dataclasses import replace

    from quant_quality import measure, train

    from moekit.infer import Engine, SamplingConfig
    from moekit.models.build import load_model
    from moekit.quantize import quantize_model
    from moekit.train.lm import prepare_data, run_config_from

    torch.set_num_threads(1)
    run = train("tiny", steps, out)
    losses = measure(run, batches)
    _, tokenizer, config = load_model(run)
    cfg = run_config_from(config, run)
    val = prepare_data(replace(cfg.data, max_bytes=min(cfg.data.max_bytes, 2_000_000)), cfg.train.seq_len, tokenizer).val
    starts = torch.linspace(0, val.numel() - prompt_len - 1, n_prompts).long().tolist()
    ps = [val[s : s + prompt_len].tolist() for s in starts]
    sampling = SamplingConfig(max_new_tokens=new_tokens, stop_token_ids=[])
    tokens = {}
    for width, (_, options) in WIDTHS.items():
        model, _, _ = load_model(run)
        with torch.no_grad():
            tokens[width] = [c.token_ids for c in Engine(quantize_model(model, **options) if options else model).generate_ids(ps, sampling)]
    agreement = {w: _agreement(t, tokens["fp32"]) for w, t in tokens.items()}
    try:
        llama = {g: _agreement(t, tokens["fp32"]) for g, t in llama_tokens(run, ps, new_tokens).items()}
    except Exception as e:  # e.g. llama-cpp-python absent, or a preset no GGUF architecture fits: reported
        llama = {"not run": f"{type(e).__name__}: {e}"}
    return {"run": str(run), "steps": steps, "eval_batches": batches, "losses": losses, "greedy_agreement_with_fp32": agreement,
            "llama_cpp_greedy_agreement_with_moekit_fp32": llama, "prompts": n_prompts, "new_tokens": new_tokens}


def _agreement(tokens: list[list[int]], ref: list[list[int]]) -> float:
    """Fraction of generated positions where the tokens equal the reference's (all prompts together)."""
    pairs = [(a, b) for x, y in zip(tokens, ref) for a, b in zip(x, y)]
    return sum(a == b for a, b in pairs) / len(pairs)


def llama_tokens(run: Path, ps: list[list[int]], new_tokens: int) -> dict[str, list[list[int]]]:
    """llama.cpp's greedy tokens on the trained model, exported by moekit's GGUF writer at each type."""
    import tempfile

    import llama_cpp

    import moekit.gguf as G
    from moekit.models.build import load_model

    model, tokenizer, _ = load_model(run)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for gguf_type, _ in WIDTHS.values():
            llm = llama_cpp.Llama(str(G.save(model, Path(d) / f"{gguf_type}.gguf", tokenizer, dtype=gguf_type)),
                                  n_ctx=256, n_threads=1, verbose=False)
            out[gguf_type] = []
            for p in ps:
                llm.reset()
                toks = []
                for tok in llm.generate(p, top_k=1, temp=0.0, reset=True):
                    toks.append(int(tok))
                    if len(toks) == new_tokens:
                        break
                out[gguf_type].append(toks)
            del llm
    return out


def _quality_child(conn, *args) -> None:
    conn.send(quality(*args))


def run_quality(*args) -> dict:
    """quality() in a spawned child (single-threaded; its training memory is returned to the OS afterwards)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_quality_child, args=(child, *args))
    p.start()
    result = parent.recv()
    p.join()
    return result


# ---------------------------------------------------------------- targets and main


def targets_of(widths: list[dict], qual: dict) -> list[dict]:
    out = []
    for b in widths:
        label = f"{b['model']} {b['width']} vs {b['gguf_type']}"
        for c in b["cells"]:
            t = f"{c['threads']} thread{'s' if c['threads'] > 1 else ''}"
            out.append(target(f"decode tok/s moekit / llama.cpp, {label}, {t}", c["decode_ratio"]["median"], DECODE_GOAL))
            out += [target(f"prefill tok/s moekit / llama.cpp, {label}, {k[7:-6]} tokens, {t}", c[k]["median"], PREFILL_GOAL)
                    for k in c if k.startswith("prefill") and k.endswith("_ratio")]
    by = {(b["model"], b["width"]): b for b in widths}
    big = max((b["model"] for b in widths), key=lambda m: list(MODELS).index(m))
    if (big, "int4") in by and (big, "fp32") in by:
        for c4, c32 in zip(by[big, "int4"]["cells"], by[big, "fp32"]["cells"]):
            value = median(c4["moekit"]["decode"]) / median(c32["moekit"]["decode"])
            out.append(target(f"moekit int4 / moekit fp32 decode tok/s, {big}, {c4['threads']} thread(s)", value,
                              INT4_OVER_FP32_GOAL))
    for w, goal in QUALITY_GOALS.items():
        out.append(target(f"val-loss increase vs fp32 in percent, {w} (experts)", 100 * qual["losses"][w]["increase"], goal, "<="))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=[m for m in MODELS if m != "tiny"], default=["100m", "1b"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--quality-steps", type=int, default=400, help="training steps of the quality model (tiny preset)")
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 round, short training; writes nothing unless --out")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results; with --quick: none)")
    args = ap.parse_args()
    models, lengths = (["tiny"], (64, 512)) if args.quick else (args.models, (64, 512))
    rounds, new_tokens = (1, 8) if args.quick else (args.rounds, args.new_tokens)
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
    widths = [bench_width(name, w, (1, 2), rounds, new_tokens, lengths) for name in models for w in WIDTHS]
    qual = run_quality(steps, batches, Path("/tmp/moekit_bench_cache") / f"quality-tiny-{steps}")
    import llama_cpp

    result = {"targets": targets_of(widths, qual), "machine": machine_info(), "command": command_line(), "quick": args.quick,
              "llama_cpp_python": llama_cpp.__version__, "llama_cpp_build_cmake_args": LLAMA_BUILD_FLAGS,
              "llama_cpp_system_info": widths[0]["ready"]["llama.cpp"].get("system_info"),
              "models": {m: MODELS[m] for m in models}, "rounds": rounds, "new_tokens": new_tokens,
              "copy_bandwidth_gbs": bandwidth, "widths": widths, "quality": qual,
              "seconds": round(time.perf_counter() - started, 1)}
    md = markdown(result)
    if not args.quick or args.out:
        for path in write_results(NAME, result, md, Path(args.out) if args.out else RESULTS_DIR):
            print(f"wrote {path}")
    print(md)


if __name__ == "__main__":
    main()
