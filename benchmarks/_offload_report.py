"""The report of benchmarks/offload.py: its Markdown tables, plot and notes, and the budgets and predictors it lays out.

Not here: building the models, running the generations or timing the targets (offload.py).
"""

from __future__ import annotations

from pathlib import Path

from _common import markdown_table

POLICIES = ("lru", "lfu", "lfru", "belady")  # not lookahead: it needs known routes (benchmarks/expert_batching.py)
from moekit.infer.offload import format_bytes

BUDGETS = ("12.5%", "25%", "50%", "100%")
# "oracle": the true next experts, from the routing trace of the same generation (the bound of prefetching one
# layer ahead on the same link); "pregated-model": next-gate on the fine-tuned pre-gated model (exact routing).
PREDICTORS = ("none", "prefetch-all", "next-gate", "pregate", "oracle", "pregated-model")
TIMED = ("none", "prefetch-all", "next-gate", "pregate", "oracle", "pregated-model")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.6 * len(models)), squeeze=False)
    xs = [float(b.rstrip("%")) for b in BUDGETS]
    for row, model in enumerate(models):
        m = results["models"][model]
        grid = m["grid"]
        preds = [p for p in PREDICTORS if any(g["predictor"] == p for g in grid)]

        def series(tier, pred, policy, key):
            return [next(g[key] for g in grid if g["tier"] == tier and g["budget"] == b and g["predictor"] == pred
                         and g["policy"] == policy) for b in BUDGETS]

        ax = axes[row][0]
        for pred in preds:
            ax.plot(xs, series("r=1", pred, "lru", "miss_rate"), marker="o", label=f"{pred} (lru)")
        ax.plot(xs, series("r=1", "none", "belady", "miss_rate"), "k--", marker="x", label="on-demand, Belady (bound)")
        ax.plot(xs, series("r=1", "oracle", "belady", "miss_rate"), "k:", marker="+", label="oracle prefetch + Belady")
        ax.set(title=f"{model}: decode miss rate", xlabel="expert budget (% of all experts)", ylabel="misses / expert uses")
        ax.legend(fontsize=7)
        for col, tier in ((1, "r=1"), (2, "r=10")):
            ax = axes[row][col]
            for pred in preds:
                ax.plot(xs, series(tier, pred, "lru", "relative_speed"), marker="o", label=pred)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set(title=f"{model}: decode speed / all-resident, EMULATED link {tier}", xlabel="expert budget (%)",
                   ylabel="relative decode speed (lru, single runs)")
            ax.legend(fontsize=7)
    fig.suptitle("Expert offloading (moekit): the link is EMULATED (bandwidth from the measured ratio r); CPU, 1 thread")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    lines = [
        "# Expert offloading, caching and pre-gated prefetch",
        "",
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores (shared), torch {results['machine']['torch']}, "
        f"{results['machine']['torch_threads']} thread, CPU. Wall time {results['seconds'] / 60:.1f} min.",
        "",
        "The r=1 and r=10 tiers are an **emulated link** (host memory + a sleep of latency + bytes / bandwidth per "
        "transfer, one transfer at a time); their bandwidth is set from the measured time of one decoder layer, so "
        "that moving one layer's top-k experts takes r layer-times. The disk tier is real: positional reads of the "
        "safetensors file with the page cache dropped after every read.",
        "",
        "## Targets (trained model, 25% budget)",
        "",
        markdown_table(["target", "value", "goal", "met"],
                       [[t["name"], t["value"], f"{t['direction']} {t['goal']}", "yes" if t["met"] else "**no**"]
                        for t in results["targets"]]),
        "",
        "Every predictor at 25%, emulated r=1, LRU, the same link, medians of interleaved repetitions "
        f"({results.get('reps', '?')} rounds; the spread is the min..max over rounds):",
        "",
        markdown_table(["predictor", "stall ms/token", "MB moved/token", "decode tokens/s"],
                       [[name, f"{r['stall_ms_per_token']:.2f} ({r['stall_ms_per_token_min']:.2f}..{r['stall_ms_per_token_max']:.2f})",
                         f"{r['bytes_per_token'] / 1e6:.2f}", f"{r['decode_tokens_per_s']:.1f}"]
                        for name, r in results["timed_targets"].items() if "stall_ms_per_token" in r]),
        "",
    ]
    heads = results.get("pregate_heads", {}).get("report", {})
    if heads:
        lines += [f"Pre-gate heads of the trained model: `train_pregate` ({heads.get('steps')} steps, batch "
                  f"{heads.get('batch_size')}x{heads.get('seq_len')}, lr {heads.get('lr')}, {heads.get('seconds', 0) / 60:.1f} min) "
                  f"in {results['pregate_heads']['dir']} (reused when present, so not always inside the wall time above); "
                  f"the pre-gated model: {results['pregated_model']['finetune_steps']} fine-tuning steps, fine-tuned in this run "
                  f"together with its control ({results['pregated_model'].get('seconds', 0) / 60:.1f} min).", ""]
    lines += results["notes"]
    for name, m in results["models"].items():
        lines += _model_section(name, m)
    lines += ["", "![offloading](offload.png)", ""]
    return "\n".join(lines)


def _model_section(name: str, m: dict) -> list[str]:
    """One model's tables: miss rate and bytes for every policy, stall and bytes on the same link, speed per tier."""
    lines: list[str] = []
    lines += [
        "",
        f"## {name}: {m['description']}",
        "",
        f"Resident decode {m['resident_tokens_per_s']:.1f} tokens/s; one decoder layer {1000 * m['layer_s']:.2f} ms; "
        f"one expert {format_bytes(m['bytes_per_expert'])}; emulated bandwidth r=1: {format_bytes(m['bandwidth']['r=1'])}/s, "
        f"r=10: {format_bytes(m['bandwidth']['r=10'])}/s; measured disk r = {m['disk_r']:.2f}. "
        f"Prompt {m['prompt_tokens']} tokens, {m['new_tokens']} new tokens; all {m['runs']} runs exact: {m['all_exact']}.",
    ]
    if m.get("pregate"):
        lines.append(f"Learned pre-gate top-k recall {m['pregate']['mean_pregate_recall']:.3f} "
                     f"(next-gate {m['pregate']['mean_next_gate_recall']:.3f}).")
    lines += ["", "Decode miss rate / MB moved per token (emulated r=1 runs; the other tiers differ only where a wrong "
              "prefetch was cancelled before it started, which depends on timing):", ""]
    preds = [p for p in PREDICTORS if any(g["predictor"] == p for g in m["grid"])]
    rows = []
    for budget in BUDGETS:
        for pred in preds:
            cells = [budget, pred]
            for policy in POLICIES:
                g = _find(m["grid"], "r=1", budget, pred, policy)
                cells.append(f"{100 * g['miss_rate']:.1f}% / {g['bytes_per_token'] / 1e6:.2f}")
            rows.append(cells)
    lines.append(markdown_table(["budget", "predictor", *POLICIES], rows))
    lines += ["", "Stall ms per token / MB moved per token, every predictor on the same emulated r=1 link (decode; "
              "single runs), with LRU and with Belady's eviction (Belady + oracle: the best this cache and link allow "
              "when prefetching one layer ahead):", ""]
    rows = []
    for budget in BUDGETS:
        for pred in preds:
            cells = [budget, pred]
            for policy in ("lru", "belady"):
                g = _find(m["grid"], "r=1", budget, pred, policy)
                cells.append(f"{g['stall_ms_per_token']:.2f} ms / {g['bytes_per_token'] / 1e6:.2f} MB")
            rows.append(cells)
    lines.append(markdown_table(["budget", "predictor", "lru", "belady"], rows))
    lines += ["", "Stall ms per token and decode tokens/s (x all-resident decode timed right before and after each "
              "tier/budget block; single runs of 32 tokens, so +-25% is noise on this shared machine; the targets above use "
              "interleaved repetitions), LRU:", ""]
    rows = []
    for budget in BUDGETS:
        for pred in preds:
            cells = [budget, pred]
            for tier in ("disk", "r=1", "r=10"):
                g = _find(m["grid"], tier, budget, pred, "lru")
                cells.append(f"{g['stall_ms_per_token']:.1f} ms, {g['decode_tokens_per_s']:.1f} ({g['relative_speed']:.2f}x)")
            rows.append(cells)
    lines.append(markdown_table(["budget", "predictor", "disk", "emulated r=1", "emulated r=10"], rows))
    return lines


def _find(grid, tier, budget, pred, policy):
    return next(g for g in grid if g["tier"] == tier and g["budget"] == budget and g["predictor"] == pred and g["policy"] == policy)




def notes(timed: dict, pregated_report: dict, m: dict, random_hf: dict | None) -> list[str]:
    """What the targets mean, in numbers of this run (trained model; random-hf last)."""
    t = timed
    out = [
        "### Reading the targets",
        "",
        f"- Timed at 25%, emulated r=1, LRU, medians of interleaved repetitions: resident {t['resident']['decode_tokens_per_s']:.1f} "
        f"tokens/s; on-demand {t['none']['decode_tokens_per_s']:.1f} tokens/s, stall {t['none']['stall_ms_per_token']:.2f} ms/token; "
        f"learned pre-gate {t['pregate']['decode_tokens_per_s']:.1f} tokens/s, stall {t['pregate']['stall_ms_per_token']:.2f} ms/token, "
        f"{format_bytes(t['pregate']['bytes_per_token'])} moved per token; the oracle (the true next experts, prefetched one layer "
        f"ahead on the same link) stall {t['oracle']['stall_ms_per_token']:.2f} ms/token, {format_bytes(t['oracle']['bytes_per_token'])} "
        f"per token. The oracle is what the learned pre-gate is compared with: both prefetch, both pay for every byte on the "
        f"same link, and a prefetch still in flight when the gate fires counts as stall for both.",
    ]
    if "pregated-model" in t:
        out.append(
            f"- The fine-tuned pre-gated model (exact prediction): {t['pregated-model']['decode_tokens_per_s']:.1f} tokens/s, "
            f"stall {t['pregated-model']['stall_ms_per_token']:.2f} ms/token, against its own resident speed "
            f"{t['pregated-resident']['decode_tokens_per_s']:.1f} tokens/s.")
    out.append(
        f"- Where the time goes at 25% (same rounds): the same on-demand run with the experts in host memory and no link "
        f"time at all ('copies only') decodes {t['copies-only']['decode_tokens_per_s']:.1f} tokens/s, stall "
        f"{t['copies-only']['stall_ms_per_token']:.2f} ms/token: copying {format_bytes(m['bytes_per_expert'])} experts between two "
        f"places in RAM is CPU work, on the same 2 busy cores as the computation. A GPU's copy engine does not take compute "
        f"time; here it does, and no prefetching can hide it. The rest of the gap to resident is the modelled link time left unhidden.")
    belady = {p: _find(m["grid"], "r=1", "25%", p, "belady") for p in ("none", "oracle")}
    out.append(
        f"- Belady at 25% (single runs, r=1): on demand {belady['none']['stall_ms_per_token']:.2f} ms/token stall, "
        f"{format_bytes(belady['none']['bytes_per_token'])}/token; with the oracle's prefetch "
        f"{belady['oracle']['stall_ms_per_token']:.2f} ms/token, {format_bytes(belady['oracle']['bytes_per_token'])}/token. "
        f"Miss counts are not compared across predictors: a prefetch still in flight is not a miss but can still stall.")
    out.append(_loss_note(pregated_report))
    out += _link_notes(t, m)
    if random_hf is not None:
        miss = _find(random_hf["grid"], "r=1", "25%", "none", "lru")["miss_rate"]
        out.append(
            f"- random-hf: with random weights the router sees nearly the same hidden state for every token, so routing "
            f"hardly changes from token to token (on-demand LRU misses {100 * miss:.1f}% at 25%); a cache alone holds it, and "
            f"prefetching only adds transfers. Its role here is the Hugging Face layout on disk (transformers' own "
            f"save_pretrained, read expert by expert), not routing.")
    return out


def _loss_note(r: dict) -> str:
    return (f"- Pre-gated model (fine-tuned in this run): validation loss {r['val_loss_original']:.4f} (original) -> "
            f"{r['val_loss_pregated_zero_shot']:.4f} rewired without fine-tuning -> {r['val_loss_pregated_finetuned']:.4f} after "
            f"{r['finetune_steps']} fine-tuning steps ({100 * r['val_loss_change']:+.2f}% against the original, which is mostly "
            f"more training); the original fine-tuned with the same recipe in the same run (control) reaches "
            f"{r['val_loss_original_finetuned']:.4f}, and against it the pre-gated model is "
            f"{100 * r['val_loss_change_vs_control']:+.2f}%: that is the target, the cost of pre-gating itself.")


def _link_notes(t: dict, m: dict) -> list[str]:
    capacity = m["bandwidth"]["r=1"] / t["resident"]["decode_tokens_per_s"]  # bytes the r=1 link moves in one token's time
    moved = {p: r["bytes_per_token"] for p, r in t.items() if "bytes_per_token" in r and p != "copies-only"}
    share = ", ".join(f"{p} {format_bytes(b)} ({100 * b / capacity:.0f}%)" for p, b in moved.items())
    return [
        f"- Link load: at r=1 the link moves one layer's top-k experts in one layer-time, i.e. {format_bytes(capacity)} per "
        f"token. At 25%, bytes moved per decode token (share of that; wrong guesses included): {share}. Transfers issued one "
        f"layer ahead queue behind each other and behind the misses, and some arrive late.",
        f"- The first MoE layer has no earlier layer of its own step: the learned pre-gate predicts it from the last "
        f"layer of the previous token (recall {m['pregate'].get('next_token_first_layer_recall') or 0:.2f}), the oracle "
        f"knows it; next-gate and the pre-gated model leave it to the cache.",
    ]
