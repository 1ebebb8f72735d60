"""The markdown of benchmarks/cpu_decode.py's results: targets, per-width tables, the weight-read floor, quality.

Only formatting (every number comes from the result dict cpu_decode.py builds); no timing here.
"""

from __future__ import annotations

from _common import markdown_table, median


def _f(x: float, nd: int = 1) -> str:
    return f"{x:.{nd}f}"


def _ratio(s: dict) -> str:
    return f"{s['median']:.2f} [{s['q1']:.2f}, {s['q3']:.2f}]"


def speed_table(result: dict) -> str:
    rows = []
    for b in result["widths"]:
        for c in b["cells"]:
            mk, ll = c["moekit"], c["llama.cpp"]
            prefill = [f"{_f(median(mk[k]), 0)} / {_f(median(ll[k]), 0)} ({_ratio(c[k + '_ratio'])})"
                       for k in sorted((k for k in mk if k.startswith("prefill")), key=lambda k: int(k[7:]))]
            rows.append([b["model"], f"{b['width']} / {b['gguf_type']}", c["threads"], _f(median(mk["decode"])),
                         _f(median(ll["decode"])), _ratio(c["decode_ratio"]), *prefill, f"{c['greedy_agreement']:.2f}"])
    lengths = sorted(int(k[7:]) for k in result["widths"][0]["cells"][0]["moekit"] if k.startswith("prefill"))
    header = ["model", "moekit / GGUF", "threads", "moekit decode tok/s", "llama.cpp decode tok/s",
              "decode ratio [q1, q3]", *[f"prefill {n} tok/s moekit / llama.cpp (ratio)" for n in lengths],
              "greedy agreement"]
    return markdown_table(header, rows)


def memory_table(result: dict) -> str:
    rows = []
    for b in result["widths"]:
        for side in ("moekit", "llama.cpp"):
            m, r = b["memory"][side], b["ready"][side]
            rows.append([b["model"], b["width"] if side == "moekit" else b["gguf_type"], side, _f(r.get("load_s", 0), 2),
                         _f(r["after_load"]["VmRSS"], 0), _f(m["VmRSS"], 0), _f(m["VmHWM"], 0)])
    return markdown_table(["model", "width", "side", "load s", "RSS after load MB", "RSS at end MB", "peak RSS (VmHWM) MB"], rows)


def floor_table(result: dict) -> str:
    """Each side's decode tok/s against bandwidth / active bytes per token (the weight-read floor)."""
    rows = []
    for b in result["widths"]:
        for c in b["cells"]:
            bw = result["copy_bandwidth_gbs"][c["threads"]] * 1e9
            cells = []
            for side in ("moekit", "llama.cpp"):
                floor = bw / b["active_bytes"][side]
                cells += [f"{b['active_bytes'][side] / 1e6:.1f}", _f(floor), f"{median(c[side]['decode']) / floor:.0%}"]
            rows.append([b["model"], f"{b['width']} / {b['gguf_type']}", c["threads"],
                         _f(result["copy_bandwidth_gbs"][c["threads"]]), *cells])
    return markdown_table(["model", "width", "threads", "copy GB/s", "moekit MB/token", "moekit floor tok/s", "moekit % of floor",
                           "llama.cpp MB/token", "llama.cpp floor tok/s", "llama.cpp % of floor"], rows)


def quality_table(q: dict) -> str:
    rows = [[w, f"{v['val_loss']:.4f}" if "val_loss" in v else "-",
             f"{100 * v['increase']:+.3f}%" if "increase" in v else v.get("error", "-")] for w, v in q["losses"].items()]
    agree = markdown_table(["width (scope all, as timed)", "greedy-token agreement with fp32"],
                           [[w, f"{a:.3f}"] for w, a in q["greedy_agreement_with_fp32"].items()])
    llama = markdown_table(["llama.cpp on moekit's GGUF export of the same model", "greedy-token agreement with moekit fp32"],
                           [[g, a if isinstance(a, str) else f"{a:.3f}"]
                            for g, a in q.get("llama_cpp_greedy_agreement_with_moekit_fp32", {}).items()])
    return "\n\n".join([markdown_table(["width", "val loss", "increase vs fp32"], rows), agree, llama])


def misses(result: dict) -> str:
    """What bounds each missed speed target, from the measured floor (no guessing)."""
    lines = []
    for b in result["widths"]:
        for c in b["cells"]:
            if c["decode_ratio"]["median"] >= 1.0:
                continue
            bw = result["copy_bandwidth_gbs"][c["threads"]] * 1e9
            pct = {s: median(c[s]["decode"]) * b["active_bytes"][s] / bw for s in ("moekit", "llama.cpp")}
            if min(pct.values()) > 0.7:
                bound = "both sides are near the memory floor, so the gap is the bytes per token"
            else:
                bound = ("moekit is below the floor by more than llama.cpp: per-token overhead (Python, dispatch, "
                         "small matmuls), not the weight read, bounds it")
            if pct["llama.cpp"] > 1.0:
                bound += " (llama.cpp runs above the DRAM floor: the active weights fit in the CPU caches here)"
            lines.append(f"- {b['model']} {b['width']} {c['threads']}t: decode ratio {c['decode_ratio']['median']:.2f}; "
                         f"moekit at {pct['moekit']:.0%} of its floor, llama.cpp at {pct['llama.cpp']:.0%} of its own: {bound}.")
    return "\n".join(lines) or "- every decode target is met."


def markdown(result: dict) -> str:
    q = result["quality"]
    tgt = markdown_table(["target", "value", "goal", "met"],
                         [[t["name"], t["value"], f"{t['direction']} {t['goal']}", t["met"]] for t in result["targets"]])
    head = ("# moekit vs llama.cpp on CPU: batch-1 decode, prefill, memory, quality"
            + (" (QUICK smoke run: tiny model, 1 round; not a measurement)" if result["quick"] else ""))
    return "\n\n".join([
        head,
        f"Command: `{result['command']}` ({result['seconds']} s). Machine: {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores, load average {result['machine']['load_average_1m']} at the end "
        "(other jobs may have shared it; ratios are paired per round, which cancels most of the drift). "
        f"llama-cpp-python {result['llama_cpp_python']}, built from source with CMAKE_ARGS=`{result['llama_cpp_build_cmake_args']}` "
        f"(the VM traps AMX; llama.cpp reports `{result.get('llama_cpp_system_info', '?')}`). Both sides read the same random weights: moekit from the HF directory (quantized at load, "
        "scope all), llama.cpp from moekit's GGUF export at the matched type. "
        f"{result['rounds']} rounds, {result['new_tokens']} new tokens per decode measurement.",
        tgt,
        "## Speed (medians; ratios are moekit / llama.cpp, paired per round, with quartiles)",
        speed_table(result),
        "## Weight-read floor (active bytes per token / copy bandwidth)",
        floor_table(result),
        "What bounds the missed decode targets (measured):\n" + misses(result),
        "## Memory (each side in its own child process)",
        memory_table(result),
        f"## Quality: tiny preset trained {q['steps']} steps on real text ({q['eval_batches']} validation batches)",
        quality_table(q),
    ])
