"""deepspeed_moe.py's setup: its names and goals, scales, models and learning-rate bookkeeping.

Both the training stages (deepspeed_moe.py) and the report
(_deepspeed_moe_report.py) import this module, and neither imports the other
the wrong way (the report never imports deepspeed_moe), so there is no import
circle. Every model has the dense model's active parameters per token (see
deepspeed_moe.py's docstring for the list).

Not here: training (deepspeed_moe.py), the report (_deepspeed_moe_report.py),
the shared harness (_harness.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from _harness import train_config as harness_train_config

from moekit.config import MoEConfig
from moekit.models.decoder import ModelConfig
from moekit.train.loop import TrainConfig

NAME = "deepspeed_moe"
FLOPS_RATIO_GOAL, PARAMS_RATIO_GOAL, LOSS_GAP_GOAL, THROUGHPUT_GOAL = 0.5, 3.0, 0.01, 0.8
NEVER = 99.0  # the FLOPs ratio recorded when a run never reaches the dense final loss
STANDARD = ("moe16_top1", "moe32_top4", "moe32_top4_alf", "moe32_top3_shared", "moe64_top7_shared",
            "moe32_top3_shared_alf")
REFERENCE = "moe16_top1"  # the standard MoE the size claim compares with (the paper's top-1 baseline)
STAGES = {"dense": ("dense",), "moe": STANDARD, "prmoe": ("prmoe",), "mos": ("mos",)}


@dataclass
class Scale:
    hidden: int
    layers: int
    heads: int
    width: int  # W: the dense FFN width = active FFN width of every model
    steps: int
    batch_size: int
    seq_len: int
    warmup: int
    evals: int
    eval_batches: int
    max_bytes: int
    throughput_rounds: int
    throughput_steps: int


# 1200 steps x 16 x 128 tokens = 2.46M tokens: 4x the earlier moe_vs_dense run (300 steps of the same batch); the
# model is a little narrower than that run's (hidden 96, W 384 vs 128, 512) so that 6 runs of 4x the tokens fit in
# ~90 min per corpus on one core (~0.5 s per step on a quiet core)
FULL = Scale(hidden=96, layers=4, heads=4, width=384, steps=1200, batch_size=16, seq_len=128, warmup=60, evals=24,
             eval_batches=6, max_bytes=2_000_000, throughput_rounds=7, throughput_steps=2)
# --scale long: the compute claim at 4x FULL's tokens again (16x the earlier experiment), on 16 MB of text so that no
# byte is seen twice (9.8M training tokens); evaluated on 2.7x the validation tokens, since crossings are read off it
LONG = replace(FULL, steps=4800, warmup=240, evals=32, eval_batches=16, max_bytes=16_000_000)
QUICK = Scale(hidden=64, layers=2, heads=4, width=128, steps=16, batch_size=8, seq_len=64, warmup=2, evals=4,
              eval_batches=2, max_bytes=200_000, throughput_rounds=2, throughput_steps=1)


# ---------------------------------------------------------------- models


def model_config(name: str, s: Scale, vocab_size: int) -> ModelConfig:
    """The run's ModelConfig: everything but the FFN identical, active FFN width W everywhere."""
    W = s.width
    base = dict(vocab_size=vocab_size, hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                num_kv_heads=s.heads, max_seq_len=s.seq_len, dense_hidden=W)
    # router probabilities as gate weights, not renormalised over the top-k (a renormalised top-1 weight is 1)
    moe = dict(norm_topk_prob=False)
    if name == "dense":
        return ModelConfig(ffn="dense", **base)
    if name == "moe16_top1":
        return ModelConfig(ffn="moe", moe=MoEConfig(num_experts=16, top_k=1, expert_hidden=W, **moe), **base)
    if name == "moe32_top4":
        return ModelConfig(ffn="moe", moe=MoEConfig(num_experts=32, top_k=4, expert_hidden=W // 4, **moe), **base)
    if name in ("moe32_top3_shared", "moe64_top7_shared"):
        E = 32 if name.startswith("moe32") else 64
        slots = E // 8  # active experts of width W / slots: one shared, the rest routed
        cfg = MoEConfig(num_experts=E, top_k=slots - 1, expert_hidden=W // slots, num_shared_experts=1, **moe)
        return ModelConfig(ffn="moe", moe=cfg, **base)
    if name == "moe32_top4_alf":
        cfg = MoEConfig(num_experts=32, top_k=4, expert_hidden=W // 4, bias_update_rate=1e-3, balance_loss="none", **moe)
        return ModelConfig(ffn="moe", moe=cfg, **base)
    if name == "moe32_top3_shared_alf":
        cfg = MoEConfig(num_experts=32, top_k=3, expert_hidden=W // 4, num_shared_experts=1, bias_update_rate=1e-3,
                        balance_loss="none", **moe)
        return ModelConfig(ffn="moe", moe=cfg, **base)
    if name in ("prmoe", "mos"):
        layers = s.layers - (name == "mos")
        base.update(num_layers=layers, dense_hidden=W // 2)
        return ModelConfig(ffn="residual_moe", pyramid=[8, 16], pyramid_layers=[layers - 1, 1],
                           moe=MoEConfig(num_experts=16, top_k=1, expert_hidden=W // 2, **moe), **base)
    raise ValueError(f"unknown model {name!r}")


def train_config(s: Scale, lr: float, seed: int = 0, budget: float = 1.0) -> TrainConfig:
    """budget < 1: a shorter run with its own warmup + cosine schedule (evaluated at the same step spacing)."""
    return harness_train_config(s, lr, seed, steps=max(1, round(s.steps * budget)), device="cpu")


def run_name(name: str, lr: float, budget: float = 1.0) -> str:
    return f"{name}_lr{lr:g}" + (f"_b{budget:g}" if budget != 1.0 else "")


def best_by_model(runs: list[dict]) -> dict[str, dict]:
    """Per model, the full-budget run of its best learning rate (lowest final validation loss): the LR tuned per model."""
    best: dict[str, dict] = {}
    for r in (r for r in runs if r.get("budget", 1.0) == 1.0):
        if r["name"] not in best or r["final_val_loss"] < best[r["name"]]["final_val_loss"]:
            best[r["name"]] = r
    return best
