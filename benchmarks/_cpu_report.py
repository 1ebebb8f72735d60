"""The markdown of benchmarks/cpu_decode.py's results: targets, per-width tables, the weight-read floor, quality.

Only formatting (every number comes from the result dict cpu_decode.py builds); no timing here.
"""

from __future__ import annotations

from _common import markdown_table, median


def _f(x: float, nd: int = 1) -> str:
    return f"{x:.{nd}f}"


def _ratio(s: dict) -> str:
    return f"{s['median']:.2f} [{s['q1']:.2f}, {s['q3']:.2f}]"


PEER = "llama.cpp"


def _peers(result: dict) -> list[str]:
    return list(result["peers"])


def speed_table(result: dict) -> str:
    rows = []
    peers = _peers(result)
    for b in result["widths"]:
        for c in b["cells"]:
            mk = c["moekit"]
            lengths = sorted(int(k[7:]) for k in mk if k.startswith("prefill"))
            for peer in peers:
                suffix = "" if peer == PEER else f"_vs_{peer}"
                ll = c[peer]
                prefill = [f"{_f(median(mk[f'prefill{n}']), 0)} / {_f(median(ll[f'prefill{n}']), 0)} ({_ratio(c[f'prefill{n}_ratio{suffix}'])})"
                           for n in lengths]
                rows.append([b["model"], f"{b['width']} / {b['gguf_type']}", c["threads"], peer, _f(median(mk["decode"])),
                             _f(median(ll["decode"])), _ratio(c["decode_ratio" + suffix]), *prefill])
    lengths = sorted(int(k[7:]) for k in result["widths"][0]["cells"][0]["moekit"] if k.startswith("prefill"))
    header = ["model", "moekit / GGUF", "threads", "peer", "moekit decode tok/s", "peer decode tok/s",
              "decode ratio [q1, q3]", *[f"prefill {n} tok/s moekit / peer (ratio)" for n in lengths]]
    return markdown_table(header, rows)


def busy_table(result: dict) -> str:
    """Decode with 1 or 2 spinning processes beside both sides (2 threads, each side's default)."""
    rows = []
    for b in result["widths"]:
        quiet = next(c for c in b["cells"] if c["threads"] == 2)
        for bc in b["busy"]:
            mk, ll = median(bc["moekit"]["decode"]), median(bc[PEER]["decode"])
            rows.append([b["model"], f"{b['width']} / {b['gguf_type']}", bc["busy_processes"], _f(mk), _f(ll),
                         _ratio(bc["decode_ratio"]), f"{mk / median(quiet['moekit']['decode']):.2f}",
                         f"{ll / median(quiet[PEER]['decode']):.2f}"])
    return markdown_table(["model", "format", "busy processes", "moekit decode tok/s", f"{PEER} decode tok/s", "ratio [q1, q3]",
                           "moekit kept (of its quiet 2-thread speed)", f"{PEER} kept"], rows)


def overhead_table(result: dict) -> str:
    """moekit's decode step split: inside the native kernels, and everything else (Python, torch ops, dispatch)."""
    rows = []
    for b in result["widths"]:
        for c in b["cells"]:
            mk = c["moekit"]
            if not mk.get("kernel_ms") or median(mk["kernel_ms"]) == 0:
                continue
            step, kern = median(mk["step_ms"]), median(mk["kernel_ms"])
            rows.append([b["model"], b["width"], c["threads"], f"{step:.2f}", f"{kern:.2f}", f"{step - kern:.2f}", f"{(step - kern) / step:.0%}"])
    return markdown_table(["model", "format", "threads", "decode step ms", "inside the native kernels ms", "outside ms",
                           "outside share"], rows)


def logits_table(result: dict) -> str:
    rows = [[b["model"], b["gguf_type"], f"{b['logits']['top1_agreement']:.3f}", f"{b['logits']['min_top1_agreement_at_a_position']:.2f}",
             f"{b['logits']['mean_cosine']:.4f}", f"{b['logits']['min_cosine']:.4f}", b["logits"]["positions"]]
            for b in result["widths"] if b.get("logits")]
    return markdown_table(["model", "file", "top-1 agreement", "lowest at one position (over prompts)", "mean cosine",
                           "min cosine", "positions"], rows)


def memory_table(result: dict) -> str:
    rows = []
    for b in result["widths"]:
        for side in b["memory"]:
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
            for side in ("moekit", PEER):
                floor = bw / b["active_bytes"][side]
                cells += [f"{b['active_bytes'][side] / 1e6:.1f}", _f(floor), f"{median(c[side]['decode']) / floor:.0%}"]
            rows.append([b["model"], f"{b['width']} / {b['gguf_type']}", c["threads"],
                         _f(result["copy_bandwidth_gbs"][c["threads"]]), *cells])
    return markdown_table(["model", "width", "threads", "copy GB/s", "moekit MB/token", "moekit floor tok/s", "moekit % of floor",
                           f"{PEER} MB/token", f"{PEER} floor tok/s", f"{PEER} % of floor"], rows)


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
            pct = {s: median(c[s]["decode"]) * b["active_bytes"][s] / bw for s in ("moekit", PEER)}
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


def peers_text(result: dict) -> str:
    return " ".join(f"{peer}: llama-cpp-python {p.get('llama_cpp_python')}, built from source with CMAKE_ARGS=`{p['build_cmake_args']}` "
                    f"(it reports `{p.get('system_info')}`)." for peer, p in result["peers"].items())


def markdown(result: dict) -> str:
    q = result["quality"]
    tgt = markdown_table(["target", "value", "goal", "met"],
                         [[t["name"], t["value"], f"{t['direction']} {t['goal']}", t["met"]] for t in result["targets"]])
    head = ("# moekit vs llama.cpp on CPU: batch-1 decode, prefill, under load, memory, quality"
            + (" (QUICK smoke run: tiny model, 1 round; not a measurement)" if result["quick"] else ""))
    return "\n\n".join([
        head,
        f"Command: `{result['command']}` ({result['seconds']} s). Machine: {result['machine']['cpu']}, "
        f"{result['machine']['cores']} cores, load average {result['machine']['load_average_1m']} at the end "
        "(ratios are paired per round, which cancels most of the drift). The VM traps AMX, so every build has it off. "
        + peers_text(result) + f" moekit's native kernels run their `{result.get('native_isa')}` build. "
        "Both sides read the same random weights: moekit from the HF directory (quantized at load, scope all) or the "
        "Q4_K_M file itself, llama.cpp from moekit's GGUF export at the matched type (Q4_K_M: llama.cpp's own quantizer "
        f"on the F32 export). {result['rounds']} rounds, {result['new_tokens']} new tokens per decode measurement.",
        tgt,
        "## Speed (medians; ratios are moekit / peer, paired per round, with quartiles)",
        speed_table(result),
        "## Under load: 1 or 2 other processes spinning beside both sides (2 threads, the default)",
        busy_table(result),
        "## Where a moekit decode step goes (quantized formats: time inside the native kernels, and the rest)",
        overhead_table(result),
        "## Weight-read floor (active bytes per token / copy bandwidth)",
        floor_table(result),
        "What bounds the missed decode targets (measured):\n" + misses(result),
        "## Logits on the Q4_K_M file (both sides read the same blocks; llama.cpp rounds activations to int8 blocks too)",
        logits_table(result),
        "## Memory (each side in its own child process)",
        memory_table(result),
        f"## Quality: tiny preset trained {q['steps']} steps on real text ({q['eval_batches']} validation batches)",
        quality_table(q),
    ])
