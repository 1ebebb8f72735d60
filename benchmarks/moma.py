"""Benchmark: MoMa (modality-aware experts) on mixed-modal data, against dense and modality-blind experts.

MoMa (Lin et al., Meta 2024) splits the experts of an early-fusion model into
a text group and an image group, routes each token by expert choice inside
its modality's group, and reports 3.7x training-FLOPs savings over a dense
model (more with mixture-of-depths). This script trains, with moekit's `fit`,
on moekit's mixed-modal data (sklearn digits as VQ tokens, captions, stdlib
text; moekit.data.mixed_modal), at equal active FLOPs per token:
  - dense:    a SwiGLU MLP of width W in every layer;
  - ec8:      8 expert-choice experts of width W, modality-blind (capacity 1: one expert per token on average);
  - moma4t4i: 4 text + 4 image experts of width W, expert choice inside each modality (MoMa);
and each again with mixture-of-depths on every other layer (`_mod`, capacity
0.25). Expert-choice models carry causal auxiliary routers (and MoD models
their predictors), trained alongside on detached inputs.

Reported: validation loss per modality (text, image, all) against training
FLOPs (analytic, moekit.train.flops.routed_training_flops_per_token); the FLOPs each model needs to reach the
dense model's final loss, per modality, over the dense run's FLOPs; and the
final loss with the causal auxiliary routers deciding (what generation uses)
against the non-causal training-time choice. Targets (the issue's): MoMa
4t4i reaches the dense final loss at <= 0.5x the dense FLOPs (overall); it
beats ec8 on the image modality (final image loss ratio < 1); its causal
loss is within 2% of the non-causal loss. Scales, runs, curves and plots are the
shared training-comparison harness's (_harness.py).

Writes benchmarks/results/moma.{json,md,png}. Run from the repository root:
    python benchmarks/moma.py            # the full run, single-threaded, about 20 minutes on a loaded CPU
    python benchmarks/moma.py --quick    # a tiny smoke test (a minute or two); writes nothing
    python benchmarks/moma.py --models dense,moma4t4i --moe-steps-factor 2   # MoMa trained 2x longer: moma_long.*
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS_DIR, command_line, machine_info, markdown_table, target, write_results  # noqa: E402
from _harness import plot_curves, reach_target, targets_markdown, train_config, train_curve  # noqa: E402

from moekit.config import MoEConfig  # noqa: E402
from moekit.data.mixed_modal import prepare_mixed_modal  # noqa: E402
from moekit.data.text import batch_at  # noqa: E402
from moekit.models.decoder import DecoderLM, ModelConfig, count_parameters  # noqa: E402
from moekit.train.flops import crossing_flops, routed_training_flops_per_token  # noqa: E402

NAME = "moma"
FLOPS_RATIO_GOAL = 0.5
CAUSAL_GAP_GOAL = 0.02
MODALITIES = ("text", "image", "all")


@dataclass
class Scale:
    hidden: int
    layers: int
    heads: int
    width: int  # dense MLP width = each expert's width
    steps: int
    batch_size: int
    seq_len: int
    warmup: int
    evals: int
    eval_batches: int
    text_bytes: int
    aux_hidden: int


FULL = Scale(hidden=96, layers=4, heads=4, width=256, steps=250, batch_size=16, seq_len=128, warmup=20, evals=10,
             eval_batches=8, text_bytes=400_000, aux_hidden=16)
QUICK = Scale(hidden=32, layers=2, heads=2, width=64, steps=12, batch_size=4, seq_len=64, warmup=2, evals=2,
              eval_batches=2, text_bytes=40_000, aux_hidden=8)

# name -> (ffn, experts per group (empty: one group), mixture-of-depths)
MODELS = {"dense": ("dense", [], False), "ec8": ("moe", [8], False), "moma4t4i": ("moe", [4, 4], False),
          "dense_mod": ("dense", [], True), "ec8_mod": ("moe", [8], True), "moma4t4i_mod": ("moe", [4, 4], True)}


def model_config(name: str, s: Scale, vocab_size: int, group_of_token: list) -> ModelConfig:
    ffn, sizes, mod = MODELS[name]
    moe = MoEConfig(num_experts=max(1, sum(sizes)), expert_hidden=s.width, router="expert_choice", capacity_factor=1.0,
                    num_groups=max(1, len(sizes)), group_sizes=sizes if len(sizes) > 1 else [], score_func="sigmoid",
                    aux_router_hidden=s.aux_hidden)
    return ModelConfig(vocab_size=vocab_size, hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                       num_kv_heads=s.heads, max_seq_len=s.seq_len, ffn=ffn, dense_hidden=s.width, moe=moe,
                       group_of_token=group_of_token, mod_layers=list(range(1, s.layers, 2)) if mod else [],
                       mod_capacity=0.25, mod_predictor_hidden=s.aux_hidden)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, moma's accounting (moekit.train.flops.routed_training_flops_per_token):

    expert choice with capacity 1 runs one expert per token on average; a mixture-of-depths layer runs
    for mod_capacity of the tokens (its router and predictor for all). Auxiliary routers and MoD
    predictors are counted in full (6x), though they need no input gradients.
    """
    return routed_training_flops_per_token(cfg, seq_len)


@torch.no_grad()
def evaluate(model: DecoderLM, val: torch.Tensor, s: Scale, text_vocab: int, causal: bool) -> dict[str, float]:
    """Mean next-token loss on fixed validation batches, by the modality of the predicted token."""
    was = model.training
    model.eval()
    sums = {m: 0.0 for m in MODALITIES}
    counts = {m: 0 for m in MODALITIES}
    for i in range(s.eval_batches):
        x, y = batch_at(val, i, s.batch_size, s.seq_len, seed=1_000_003)
        ce = F.cross_entropy(model(x, causal_routing=causal).logits.flatten(0, 1), y.flatten(), reduction="none")
        image = y.flatten() >= text_vocab
        for m, keep in (("text", ~image), ("image", image), ("all", torch.ones_like(image))):
            sums[m] += float(ce[keep].sum())
            counts[m] += int(keep.sum())
    model.train(was)
    return {m: sums[m] / max(counts[m], 1) for m in MODALITIES}


def train_one(name: str, s: Scale, data, seed: int, work: Path, steps_factor: float = 1.0) -> dict:
    if name != "dense" and steps_factor != 1.0:
        s = replace(s, steps=round(s.steps * steps_factor), evals=round(s.evals * steps_factor))
    cfg = model_config(name, s, data.tokenizer.vocab_size, data.group_of_token)
    text_vocab = data.group_of_token[1][0]
    tc = train_config(s, 3e-3, seed)
    torch.manual_seed(seed)
    model = DecoderLM(cfg)
    fpt = flops_per_token(cfg, s.seq_len)
    curve, seconds = train_curve(model, tc, train_tokens=data.train, flops_per_token=fpt, run_dir=work / name,
                                 evaluate=lambda m: evaluate(m, data.val, s, text_vocab, causal=False), val_key="all",
                                 tokenizer=data.tokenizer)
    causal = evaluate(model, data.val, s, text_vocab, causal=True)
    accuracy = _predictor_accuracy(model, data.val, s)
    return {"params": count_parameters(model), "flops_per_token": fpt, "total_flops": curve[-1]["flops"],
            "final": {m: curve[-1][m] for m in MODALITIES}, "final_causal": causal, "predictor_accuracy": accuracy,
            "train_seconds": round(seconds, 1), "curve": curve}


@torch.no_grad()
def _predictor_accuracy(model: DecoderLM, val: torch.Tensor, s: Scale) -> dict[str, float]:
    """How often the causal auxiliary routers / MoD predictors agree with the non-causal choice (validation)."""
    model.eval()
    x, _ = batch_at(val, 0, s.batch_size, s.seq_len, seed=1_000_003)
    out = model(x, causal_routing=False)
    stats = {k: float(v) for k, v in out.aux_losses.items() if k.endswith("_accuracy")}
    taken = [r.token_idx_N.unique().numel() / max(r.num_tokens, 1) for r in out.routings if r is not None]
    if taken:  # expert choice leaves some tokens to no expert of a layer
        stats["tokens_without_expert"] = 1 - sum(taken) / len(taken)
    return stats


def analyse(models: dict) -> tuple[list[dict], dict]:
    dense = models["dense"]
    crossings = {}
    for name, m in models.items():
        crossings[name] = {}
        for mod in MODALITIES:
            pts = [(p["flops"], p[mod]) for p in m["curve"]]
            cross = crossing_flops(pts, dense["final"][mod])
            crossings[name][mod] = None if cross is None else cross / dense["total_flops"]
    targets = []
    for name in ("moma4t4i", "moma4t4i_mod"):
        if name not in models:
            continue
        ratio = crossings[name]["all"]
        label = f"{name}: training FLOPs to reach the dense final val loss (all tokens) / dense FLOPs"
        m = models[name]
        targets.append(reach_target(label, ratio, FLOPS_RATIO_GOAL, m["final"]["all"], dense["final"]["all"],
                                    m["total_flops"] / dense["total_flops"]))
    for name, base in (("moma4t4i", "ec8"), ("moma4t4i_mod", "ec8_mod")):
        if name in models and base in models:
            ratio = models[name]["final"]["image"] / models[base]["final"]["image"]
            targets.append(target(f"{name} final image val loss / {base} final image val loss (beats: < 1)", ratio, 1.0, "<="))
    for name in ("moma4t4i", "moma4t4i_mod"):
        if name in models:
            m = models[name]
            gap = m["final_causal"]["all"] / m["final"]["all"] - 1
            targets.append(target(f"{name}: causal (auxiliary routers) val loss / non-causal - 1", gap, CAUSAL_GAP_GOAL, "<="))
    return targets, crossings


def report(result: dict) -> str:
    rows = []
    for name, m in result["models"].items():
        c = result["flops_to_dense_final_loss_ratio"][name]
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        rows.append([name, f"{m['flops_per_token'] / 1e6:.2f}", *(f"{m['final'][k]:.4f}" for k in MODALITIES),
                     f"{m['final_causal']['all']:.4f}", *(fmt(c[k]) for k in MODALITIES),
                     ", ".join(f"{k.replace('_accuracy', '')} {v:.3f}" for k, v in m["predictor_accuracy"].items()) or "-"])
    header = ["model", "MFLOPs/token", "val text", "val image", "val all", "causal all",
              "FLOPs to dense (text)", "(image)", "(all)", "predictor accuracy (tokens without expert)"]
    return "\n\n".join([
        "# MoMa: modality-aware expert choice on mixed-modal data",
        f"`{result['command']}`" + (" (QUICK: a smoke test, not a measurement)" if result["quick"] else ""),
        f"data: {result['data']}",
        f"machine: {result['machine'].get('cpu')}, {result['machine'].get('torch_threads')} thread(s), 1-minute load "
        f"average {result['machine'].get('load_average_1m')} at the end; {result['notes']}",
        markdown_table(header, rows),
        "FLOPs to dense = training FLOPs at which the model first reaches the dense model's final validation loss "
        "on that modality, over the dense run's total FLOPs (- : never within the budget).",
        targets_markdown(result["targets"]),
    ])


def plot(result: dict, path: Path) -> None:
    panels = []
    for mod in MODALITIES:
        series = []
        for name, m in result["models"].items():
            pts = [p for p in m["curve"] if p["step"] > 0]
            series.append((name, [p["flops"] for p in pts], [p[mod] for p in pts],
                           {"linestyle": "--" if name.endswith("_mod") else "-"}))
        panels.append({"title": f"validation loss: {mod} tokens", "series": series, "ylabel": "",
                       "hlines": [(result["models"]["dense"]["final"][mod], {})]})
    plot_curves(panels, path, size=(16 / 3, 4.5), dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps; prints, writes nothing")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--moe-steps-factor", type=float, default=1.0,
                        help="train the non-dense models this many times longer (to find where they cross the dense "
                             "final loss); results go to moma_long.*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    names = [n for n in args.models.split(",") if n]
    if "dense" not in names or any(n not in MODELS for n in names):
        parser.error(f"--models must include dense and name only {', '.join(MODELS)}")
    data = prepare_mixed_modal(patch=2, codes=64, text_max_bytes=s.text_bytes, text_ratio=0.5, repeats=4, seed=args.seed)
    print(f"data: {data.source}; train {data.train.numel()} tokens, image share "
          f"{float((data.train >= data.group_of_token[1][0]).float().mean()):.2f}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="moekit_moma_"))
    models = {}
    try:
        for name in names:
            models[name] = train_one(name, s, data, args.seed, work, args.moe_steps_factor)
            m = models[name]
            print(f"{name}: {m['train_seconds']} s, final {m['final']}, causal all {m['final_causal']['all']:.4f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    targets, crossings = analyse(models)
    result = {"targets": targets, "machine": machine_info(), "command": command_line(), "quick": args.quick,
              "data": data.source, "scale": s.__dict__, "models": models, "flops_to_dense_final_loss_ratio": crossings,
              "notes": "quality figures (losses against analytic FLOPs); train_seconds under load are not timings"}
    text = report(result)
    print(text)
    if args.quick:
        return 0
    name = NAME if args.moe_steps_factor == 1.0 else f"{NAME}_long"
    write_results(name, result, text)
    plot(result, RESULTS_DIR / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
