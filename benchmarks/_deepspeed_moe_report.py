"""The `report` stage of deepspeed_moe.py: the three claims from the saved curves, training tokens/s, plots.

Reads every run's JSON under the results root (one folder per corpus), keeps
each model's best learning rate, and computes: the FLOPs at which each MoE
first reaches the dense model's final validation loss (as a fraction of the
dense run's FLOPs); the parameters of PR-MoE and of the MoS student against
the standard top-1 MoE and their loss gap; the training tokens/s of every
MoE against dense, timed interleaved on the trained checkpoints (or, if the
checkpoints are gone, on freshly built models, and then said so). Writes
<name>.json/.md and one loss-vs-FLOPs PNG per corpus.

Not here: training (deepspeed_moe.py), the models and names (_deepspeed_moe_setup.py: this module never
imports deepspeed_moe.py), the FLOPs model (moekit.train.flops), curves, throughput and plots in
general (_harness.py).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from statistics import median

import torch

from _common import command_line, load_average, machine_info, markdown_table, target, write_results
from _deepspeed_moe_setup import (FLOPS_RATIO_GOAL, LOSS_GAP_GOAL, NAME, NEVER, PARAMS_RATIO_GOAL, REFERENCE, STANDARD,
                                  THROUGHPUT_GOAL, best_by_model, model_config, run_name, train_config)
from _harness import corpora, lm_loss_fn, load_runs, load_trained, plot_curves, throughput

from moekit.checkpoints import resolve_checkpoint
from moekit.data.text import batch_at
from moekit.errors import MoekitError
from moekit.models.decoder import DecoderLM
from moekit.train.flops import crossing_flops
from moekit.train.lm import prepare_data
from moekit.train.loop import make_optimizer

COMPUTE_MODELS = (*STANDARD, "prmoe")  # the MoS student learns from a teacher: not a from-scratch compute claim


def analyse(best: dict[str, dict], runs: list[dict] | None = None) -> dict:
    """Compute and size figures of one corpus: size from each model's best-LR full run, compute from any of its runs.

    A model's FLOPs to the dense final loss is the least over its runs (every
    learning rate and budget): a shorter run with its own schedule that ends
    at the dense loss counts at its total FLOPs.
    """
    dense = best["dense"]
    level, dense_flops = dense["final_val_loss"], dense["total_flops"]
    compute, compute_run = {}, {}
    for name in COMPUTE_MODELS:
        for r in [r for r in (runs or best.values()) if r["name"] == name]:
            hit = crossing_flops([(p["flops"], p["val_loss"]) for p in r["curve"]], level)
            ratio = None if hit is None else hit / dense_flops
            if name not in compute or (ratio is not None and (compute[name] is None or ratio < compute[name])):
                compute[name], compute_run[name] = ratio, f"lr={r['lr']:g} budget={r.get('budget', 1.0):g}"
    size = {}
    ref = best.get(REFERENCE)
    for name in ("prmoe", "mos"):
        if ref is not None and name in best:
            size[name] = {"params_ratio": ref["params"]["total"] / best[name]["params"]["total"],
                          "loss_gap": best[name]["final_val_loss"] / ref["final_val_loss"] - 1}
    reached = {k: v for k, v in compute.items() if v is not None}
    missing = [n for n in ("dense", *STANDARD, "prmoe", "mos") if n not in best]
    return {"dense_final_val_loss": level, "dense_flops": dense_flops, "flops_ratio_to_dense_final": compute,
            "flops_ratio_run": compute_run,
            "best_moe": min(reached, key=reached.get) if reached else None, "missing_runs": missing, "size_vs_" + REFERENCE: size}


# what the field learned since 2022, one change at a time: (question, the run with it, the run without it)
ABLATIONS = (("fine-grained experts (32 of W/4, top-4) vs 16 of W, top-1", "moe32_top4", "moe16_top1"),
             ("a shared expert (top-3 + 1 shared) vs top-4 routed, balance loss", "moe32_top3_shared", "moe32_top4"),
             ("finer still (64 of W/8, top-7 + 1 shared) vs 32 of W/4, top-3 + 1 shared", "moe64_top7_shared",
              "moe32_top3_shared"),
             ("aux-loss-free balancing vs the balance loss, top-4", "moe32_top4_alf", "moe32_top4"),
             ("aux-loss-free balancing vs the balance loss, top-3 + 1 shared", "moe32_top3_shared_alf", "moe32_top3_shared"))
BASE_LR = 3e-3  # the untuned learning rate every model ran at first


def ablation(best: dict[str, dict], runs: list[dict], compute: dict) -> list[dict]:
    """Which of the post-2022 changes mattered: each change's final-loss difference at each side's best LR,
    and a tuned learning rate's gain over BASE_LR per model (full-budget runs only)."""
    rows = [{"change": q, "with": a, "without": b, "final_with": best[a]["final_val_loss"],
             "final_without": best[b]["final_val_loss"],
             "loss_change": best[a]["final_val_loss"] / best[b]["final_val_loss"] - 1,
             "flops_ratio_with": compute.get(a), "flops_ratio_without": compute.get(b)}
            for q, a, b in ABLATIONS if a in best and b in best]
    for name, r in sorted(best.items()):
        full = sorted((x for x in runs if x["name"] == name and x.get("budget", 1.0) == 1.0), key=lambda x: x["lr"])
        base = [x for x in full if x["lr"] == BASE_LR]
        if base and len(full) > 1:  # a sweep ran: the best LR against the untuned one (0% when the untuned one won)
            others = ", ".join(f"{x['lr']:g}: {100 * (x['final_val_loss'] / r['final_val_loss'] - 1):+.2f}%"
                               for x in full if x is not r)
            tried = ", ".join(f"{x['lr']:g}" for x in full)
            rows.append({"change": f"tuned learning rate (best of {tried}: {r['lr']:g}; the others vs it: {others})",
                         "with": name, "without": name,
                         "final_with": r["final_val_loss"], "final_without": base[0]["final_val_loss"],
                         "loss_change": r["final_val_loss"] / base[0]["final_val_loss"] - 1,
                         "flops_ratio_with": None, "flops_ratio_without": None})
    return rows


def measure_throughput(s, corpus: str, dcfg, best: dict[str, dict], work: Path) -> dict:
    """Training tokens/s of each model's best run, interleaved in one process; ratios to dense."""
    data = prepare_data(dcfg, s.seq_len)
    models, source = {}, "trained checkpoints"
    for name, run in best.items():
        if name == "mos":
            continue  # the student's speed is not a claim here; its size is
        run_dir = work / corpus / run_name(name, run["lr"])
        try:
            models[name] = load_trained(resolve_checkpoint(run_dir)).train()
        except MoekitError:  # checkpoints removed (another machine, a cleaned temp dir): time fresh models instead
            torch.manual_seed(0)
            models[name], source = DecoderLM(model_config(name, s, data.tokenizer.vocab_size)), "freshly built models"
    tps = throughput(models, data.train, train_config(s, 3e-3), s)
    return {"corpus": corpus, "source": source, "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
            "ratio_to_dense": {k: round(v / tps["dense"], 3) for k, v in tps.items() if k != "dense"},
            "breakdown": step_breakdown(models, data, train_config(s, 3e-3), s)}


MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm")


def step_breakdown(models: dict, data, tc, s) -> dict[str, dict]:
    """What bounds an MoE's tokens/s against dense: per model, the median forward+backward and clip+AdamW
    times of a training step (ms) and its matmul calls (torch.profiler, one step)."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, trained in models.items():
        model = copy.deepcopy(trained).train()
        optimizer, loss_fn = make_optimizer(model, tc), lm_loss_fn(tc)

        def step(i: int) -> tuple[float, float]:
            t0 = time.perf_counter()
            loss, _ = loss_fn(model, batch_at(data.train, i, tc.batch_size, tc.seq_len, tc.seed + 11))
            loss.backward()
            t1 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return t1 - t0, time.perf_counter() - t1

        step(0)  # warm-up (the optimizer's state is created here)
        fb, opt = zip(*[step(i) for i in range(1, s.throughput_rounds + 1)])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(s.throughput_rounds + 1)
        calls = sum(e.count for e in prof.key_averages() if e.key in MATMULS)
        out[name] = {"forward_backward_ms": round(1e3 * median(fb), 2), "optimizer_ms": round(1e3 * median(opt), 2),
                     "matmul_calls": calls, "params": sum(p.numel() for p in model.parameters())}
    return out


def plot(corpus: str, runs: list[dict], best: dict[str, dict], path: Path) -> Path:
    series = []
    for r in sorted(runs, key=lambda r: r["name"]):
        short = r.get("budget", 1.0) != 1.0
        is_best = best.get(r["name"]) is r or short
        style = {"linestyle": "-" if is_best else ":", "linewidth": 1.8 if is_best else 0.8, "marker": "." if is_best else None}
        label = f"{r['name']} lr={r['lr']:g}" + (f" budget {r['budget']:g}" if short else "") + \
            ("" if is_best else " (not best lr)")
        series.append((label, [p["flops"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], style))
    hlines = [(best["dense"]["final_val_loss"], {"color": "k", "linewidth": 0.6, "linestyle": "--",
                                                 "label": "dense final val loss"})] if "dense" in best else []
    finals = [r["final_val_loss"] for r in runs]
    panel = {"title": f"DeepSpeed-MoE claims on moekit: {corpus}, equal active parameters", "series": series,
             "hlines": hlines, "ylim": (min(finals) - 0.1, max(finals) + 0.8)}
    return plot_curves([panel], path, size=(8, 5), dpi=120)


def targets_of(per_corpus: dict, speed: dict | None) -> list[dict]:
    ratios = [v for c in per_corpus.values() for v in c["flops_ratio_to_dense_final"].values() if v is not None]
    out = [target("compute: best MoE's FLOPs to reach the dense final val loss / dense FLOPs (best corpus; "
                  f"{NEVER:g} = never reached)", min(ratios, default=NEVER), FLOPS_RATIO_GOAL, "<=")]
    for corpus, c in per_corpus.items():
        mos = c["size_vs_" + REFERENCE].get("mos")
        if mos is not None:
            out.append(target(f"size: {REFERENCE} params / PR-MoE+MoS student params ({corpus})", mos["params_ratio"],
                              PARAMS_RATIO_GOAL, ">="))
            out.append(target(f"size: PR-MoE+MoS student val loss above {REFERENCE}'s, fraction ({corpus})",
                              mos["loss_gap"], LOSS_GAP_GOAL, "<="))
    if speed is not None and speed["ratio_to_dense"]:
        best = per_corpus.get(speed["corpus"], {}).get("best_moe") or max(speed["ratio_to_dense"], key=speed["ratio_to_dense"].get)
        out.append(target(f"speed: training tokens/s of the best MoE ({best}) / dense ({speed['corpus']})",
                          speed["ratio_to_dense"].get(best, 0.0), THROUGHPUT_GOAL, ">="))
    return out


def report(s, root: Path, work: Path, out_dir: Path, quick: bool, scale: dict, lrs: list[float],
           under_load: bool = False, name: str = NAME) -> None:
    found, _ = corpora(s)
    per_corpus, runs_of, speed = {}, {}, None
    out_dir.mkdir(parents=True, exist_ok=True)
    for corpus in found:
        runs = load_runs(root / corpus)
        best = best_by_model(runs)
        if "dense" not in best:
            print(f"[{corpus}] no dense run yet: skipped in the report")
            continue
        per_corpus[corpus], runs_of[corpus] = analyse(best, runs), runs
        per_corpus[corpus]["ablation"] = ablation(best, runs, per_corpus[corpus]["flops_ratio_to_dense_final"])
        plot(corpus, runs, best, out_dir / f"{name}_{corpus}.png")
        if speed is None:
            speed = measure_throughput(s, corpus, found[corpus], best, work)
    load = load_average()
    lrs = sorted({r["lr"] for rs in runs_of.values() for r in rs}) or lrs  # what the saved runs really tried
    result = {
        "name": name, "targets": targets_of(per_corpus, speed), "machine": machine_info("cpu"), "command": command_line(),
        "quick": quick, "measured_under_load": bool(under_load or quick or load is None or load > torch.get_num_threads() + 0.5),
        "scale": scale, "lrs": lrs, "corpora": per_corpus, "throughput": speed,
        "runs": {c: [{k: v for k, v in r.items() if k != "curve"} | {"curve": r["curve"]} for r in rs]
                 for c, rs in runs_of.items()},
    }
    json_path, md_path = write_results(name + ("_quick" if quick else ""), result, markdown(result), out_dir)
    print(f"wrote {json_path}, {md_path}")
    for t in result["targets"]:
        print(f"  {'MET ' if t['met'] else 'MISS'} {t['name']}: {t['value']} (goal {t['direction']} {t['goal']})")


def best_run(runs: list[dict], name: str) -> dict | None:
    return best_by_model([r for r in runs if r["name"] == name]).get(name)


def markdown(result: dict) -> str:
    lines = [f"# DeepSpeed-MoE claims on moekit{' (QUICK smoke run: not a result)' if result['quick'] else ''}", "",
             f"Command: `{result['command']}`; scale {result['scale']}; learning rates tried: {result['lrs']}.", ""]
    if result["measured_under_load"]:
        lines += [f"**Measured under load** (1-min load average {result['machine'].get('load_average_1m')} on "
                  f"{result['machine'].get('cores')} cores): the tokens/s figures are not final.", ""]
    lines += ["## Targets", "", markdown_table(["target", "value", "goal", "met"],
              [[t["name"], t["value"], f"{t['direction']} {t['goal']}", "yes" if t["met"] else "**no**"] for t in result["targets"]]), ""]
    for corpus, c in result["corpora"].items():
        ratios = c["flops_ratio_to_dense_final"]
        size = c["size_vs_" + REFERENCE]
        rows = []
        for r in sorted(result["runs"][corpus], key=lambda r: (r["name"], r["lr"], -r.get("budget", 1.0))):
            is_best = r is best_run(result["runs"][corpus], r["name"])
            ratio = ratios.get(r["name"], "") if is_best else ""
            rows.append([r["name"], f"{r['lr']:g}", f"{r.get('budget', 1.0):g}", f"{r['params']['total']:,}",
                         f"{r['params']['active']:,}", f"{r['final_val_loss']:.4f}",
                         "never" if is_best and r["name"] in ratios and ratio is None
                         else f"{ratio:.3f}" if isinstance(ratio, float) else "",
                         f"{size[r['name']]['params_ratio']:.2f}x / {100 * size[r['name']]['loss_gap']:+.2f}%"
                         if is_best and r["name"] in size else ""])
        lines += [f"## {corpus}", "", f"Dense final validation loss {c['dense_final_val_loss']:.4f} at "
                  f"{c['dense_flops']:.3g} FLOPs; best MoE: {c['best_moe']}. Plot: `{result.get('name', NAME)}_{corpus}.png`.", "",
                  *([f"**Partial**: not run yet: {', '.join(c['missing_runs'])} (their targets are absent).", ""]
                    if c.get("missing_runs") else []),
                  f"FLOPs to dense final: the least over a model's runs ({c.get('flops_ratio_run', {})}).", "",
                  markdown_table(["run", "lr", "budget", "params", "active", "final val loss", "FLOPs to dense final / dense",
                                  f"{REFERENCE} params / this, loss gap"], rows), ""]
        lines += ablation_markdown(c.get("ablation", []))
    speed = result["throughput"]
    if speed:
        lines += ["## Training tokens/s", "", f"Timed interleaved on {speed['corpus']} ({speed['source']}).", "",
                  markdown_table(["model", "tokens/s", "/ dense"], [[k, v, speed["ratio_to_dense"].get(k, 1.0)]
                                                                   for k, v in speed["tokens_per_s"].items()]), ""]
        lines += breakdown_markdown(speed.get("breakdown", {}))
    return "\n".join(lines)


def ablation_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    fmt = lambda v: "never" if v is None else f"{v:.3f}"
    return ["What mattered (each change alone; final validation loss at each side's best learning rate; negative "
            "is better; FLOPs to dense final / dense, where reached):", "",
            markdown_table(["change", "with", "without", "final with / without", "loss change", "FLOPs ratio with / without"],
                           [[r["change"], r["with"], r["without"], f"{r['final_with']:.4f} / {r['final_without']:.4f}",
                             f"{100 * r['loss_change']:+.2f}%", "" if r["with"] == r["without"]
                             else f"{fmt(r['flops_ratio_with'])} / {fmt(r['flops_ratio_without'])}"] for r in rows]), ""]


def breakdown_markdown(rows: dict[str, dict]) -> list[str]:
    if not rows:
        return []
    return ["What bounds it (one training step per model, medians; matmul calls from torch.profiler): an MoE calls "
            "one matmul per expert and matrix, and its optimizer updates every expert's weights.", "",
            markdown_table(["model", "forward+backward ms", "clip+AdamW ms", "matmul calls", "parameters"],
                           [[k, v["forward_backward_ms"], v["optimizer_ms"], v["matmul_calls"], f"{v['params']:,}"]
                            for k, v in rows.items()]), ""]
