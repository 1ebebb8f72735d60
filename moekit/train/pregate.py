"""Pre-gating (Pre-gated MoE, ISCA 2024): knowing block i+1's experts while block i runs.

Two ways, both trained on the model's own training corpus:

- **Learned pre-gate heads** (a predictor; the model is unchanged). One small
  head per MoE layer i maps that layer's MoE input to logits over the
  experts of MoE layer i+1. Heads start from layer i+1's router weights
  (so step 0 equals the training-free next-gate predictor) and are trained
  by distillation: KL(real router of i+1 || head), the real router seeing
  its own input. `train_pregate` reports the top-k recall per layer, for
  the heads and for next-gate. `moekit pregate CKPT --out DIR` runs it;
  `moekit generate ... --prefetch pregate --pregate DIR` uses the heads.
- **The pre-gated model** (the paper's co-design). The model itself routes
  block i+1 with layer i+1's router applied to block i's MoE input, so the
  routing of block i+1 is known exactly one block early: no mispredictions
  at inference. `apply_pregated_routing` rewires a built model with hooks
  (parameter names are unchanged); `finetune_pregated` fine-tunes it
  briefly and reports the validation loss against the original model.
  The first MoE layer keeps its own routing.

Not here: moving weights and caching them (moekit.infer.offload /
expert_cache), the predictor interface (moekit.infer.prefetch).

Shape legend: T tokens, D hidden, E experts of the predicted layer, K top-k.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError
from ..models.pregated import (  # noqa: F401 (re-exported)
    HEADS_FILE, REPORT_FILE, PreGateError, PreGateHeads, apply_pregated_routing, load_pregate_heads, moe_layers_of,
)

PREGATED_MARKER = "pregated.json"
PREGATED_MODEL_DIR = "pregated-model"


def _moe_layers(model: nn.Module) -> list:
    return moe_layers_of(model)


# ---------------------------------------------------------------- heads


def save_pregate_heads(heads: PreGateHeads, out_dir: str | Path, report: dict) -> Path:
    """DIR/pregate.safetensors (the heads) and DIR/pregate.json (the report, with the shapes they fit)."""
    from ..checkpoints import save_tensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / HEADS_FILE, {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()})
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return out


def _next_token_pairs(x_BTD: torch.Tensor, y_BTE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of x at positions 0..T-2, rows of y at positions 1..T-1), flattened."""
    return x_BTD[:, :-1].reshape(-1, x_BTD.shape[-1]), y_BTE[:, 1:].reshape(-1, y_BTE.shape[-1])


class _RouterTap:
    """Captures each MoE layer's router input and logits during a forward pass."""

    def __init__(self, layers):
        self.inputs: list[torch.Tensor | None] = [None] * len(layers)
        self.logits: list[torch.Tensor | None] = [None] * len(layers)
        self.topk: list[torch.Tensor | None] = [None] * len(layers)
        self.handles = [m.router.register_forward_hook(self._hook(i)) for i, m in enumerate(layers)]
        self.top_k = [m.cfg.top_k for m in layers]

    def _hook(self, i):
        def hook(module, args, routing):
            self.inputs[i] = args[0].detach()
            self.logits[i] = routing.logits_TE.detach().float()
            T = routing.num_tokens
            self.topk[i] = routing.expert_idx_N.detach()[: T * self.top_k[i]].view(T, self.top_k[i])
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def distill_loss(student_TE: torch.Tensor, teacher_TE: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the experts, averaged over tokens."""
    return F.kl_div(student_TE.float().log_softmax(-1), teacher_TE.float().log_softmax(-1), log_target=True, reduction="batchmean")


def topk_recall(pred_logits_TE: torch.Tensor, true_idx_TK: torch.Tensor) -> float:
    """Mean over tokens of |predicted top-k ∩ true top-k| / k."""
    K = true_idx_TK.shape[1]
    pred_TK = pred_logits_TE.topk(K, dim=-1).indices
    hits = (pred_TK[:, :, None] == true_idx_TK[:, None, :]).any(-1).float().sum(-1)
    return float(hits.mean() / K)


@torch.no_grad()
def _router_selection_logits(router, x_TD: torch.Tensor) -> torch.Tensor:
    """Scores whose top-k is the router's selection for x_TD (next-gate)."""
    if hasattr(type(router), "select"):
        idx_TK, _ = type(router).select(router, x_TD)
        scores = torch.zeros(x_TD.shape[0], router.cfg.num_experts, device=x_TD.device)
        return scores.scatter(1, idx_TK, 1.0 + torch.arange(idx_TK.shape[1], 0, -1, device=x_TD.device, dtype=torch.float32).expand_as(idx_TK))
    return router.forward(x_TD).logits_TE.float()


@torch.no_grad()
def measure_recall(model, heads: PreGateHeads | None, batches: list[torch.Tensor]) -> dict:
    """Top-k recall per predicted layer (1..L-1) of the heads and of next-gate, on the given input batches."""
    layers = _moe_layers(model)
    tap = _RouterTap(layers)
    L = len(layers)
    sums = {"pregate": [0.0] * (L - 1), "next_gate": [0.0] * (L - 1)}
    wrap = heads is not None and "wrap" in heads.heads
    wrap_sum = 0.0
    try:
        for x in batches:
            model(x)
            for i in range(L - 1):
                true_TK = tap.topk[i + 1]
                if heads is not None:
                    sums["pregate"][i] += topk_recall(heads(i, tap.inputs[i]), true_TK)
                sums["next_gate"][i] += topk_recall(_router_selection_logits(layers[i + 1].router, tap.inputs[i]), true_TK)
            if wrap:
                B, T = x.shape
                inp, true_TK = _next_token_pairs(tap.inputs[-1].view(B, T, -1), tap.topk[0].view(B, T, -1))
                wrap_sum += topk_recall(heads("wrap", inp), true_TK)
    finally:
        tap.remove()
    n = max(len(batches), 1)
    rows = []
    for i in range(L - 1):
        row = {"layer": i + 1, "next_gate_recall": sums["next_gate"][i] / n}
        if heads is not None:
            row["pregate_recall"] = sums["pregate"][i] / n
        rows.append(row)
    return {"layers": rows,
            "mean_next_gate_recall": sum(r["next_gate_recall"] for r in rows) / max(len(rows), 1),
            "mean_pregate_recall": (sum(r["pregate_recall"] for r in rows) / max(len(rows), 1)) if heads is not None else None,
            "next_token_first_layer_recall": wrap_sum / n if wrap else None}


def train_pregate(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    steps: int = 200,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 3e-3,
    eval_batches: int = 8,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Train pre-gate heads for a moekit LM checkpoint on its training corpus; write DIR/pregate.{safetensors,json}."""
    from ..data.text import batch_at
    from .lm import load_lm, prepare_data

    for name, value, lo in (("steps", steps, 1), ("batch_size", batch_size, 1), ("seq_len", seq_len, 2), ("eval_batches", eval_batches, 1)):
        if not isinstance(value, int) or value < lo:
            raise ConfigError(f"{name}={value!r} is invalid: it must be an integer >= {lo}")
    if not lr > 0:
        raise ConfigError(f"lr={lr} is invalid: it must be > 0")
    started = time.perf_counter()
    model, tokenizer, cfg = load_lm(checkpoint)
    if (Path(out_dir) / "pregate.safetensors").exists():  # (as convert, quantize and moefy refuse to overwrite)
        raise ConfigError(f"{out_dir} already holds pre-gate heads (pregate.safetensors): give a new directory or delete them")
    seq_len = min(seq_len, cfg.model.max_seq_len)
    data = prepare_data(cfg.data, seq_len, tokenizer)
    heads, report = distill_pregate(
        model,
        lambda step: batch_at(data.train, step, batch_size, seq_len, seed + 17)[0],
        [batch_at(data.val, i, batch_size, seq_len, seed + 1_000_003)[0] for i in range(eval_batches)],
        steps=steps, lr=lr, progress=progress,
    )
    report = {"checkpoint": str(Path(checkpoint).resolve()), "batch_size": batch_size, "seq_len": seq_len, **report,
              "seconds": time.perf_counter() - started}
    save_pregate_heads(heads, out_dir, report)
    report["out_dir"] = str(out_dir)
    return report


def distill_pregate(model: nn.Module, train_batch, val_batches: list[torch.Tensor], *, steps: int = 200,
                    lr: float = 3e-3, progress: bool = False) -> tuple[PreGateHeads, dict]:
    """Heads for any moekit model: `train_batch(step)` gives input ids; recall is measured on `val_batches`."""
    model.eval().requires_grad_(False)
    layers = _moe_layers(model)
    heads = PreGateHeads.from_model(model)
    before = measure_recall(model, heads, val_batches)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    tap = _RouterTap(layers)
    losses = []
    try:
        for step in range(steps):
            x = train_batch(step)
            with torch.no_grad():
                model(x)
            for group in optimizer.param_groups:  # cosine decay to 10%
                group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
            loss = sum(distill_loss(heads(i, tap.inputs[i]), tap.logits[i + 1]) for i in range(len(layers) - 1))
            B, T = x.shape
            inp, target = _next_token_pairs(tap.inputs[-1].view(B, T, -1), tap.logits[0].view(B, T, -1))
            loss = loss + distill_loss(heads("wrap", inp), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress and (step + 1) % max(1, steps // 10) == 0:
                print(f"pregate step {step + 1}/{steps} distillation loss {losses[-1]:.4f}", flush=True)
    finally:
        tap.remove()
    after = measure_recall(model, heads, val_batches)
    return heads, {
        "steps": steps, "lr": lr,
        "top_k": [m.cfg.top_k for m in layers],
        "num_experts": [m.cfg.num_experts for m in layers],
        "hidden_size": [m.cfg.hidden_size for m in layers],
        "layers": after["layers"],
        "mean_pregate_recall": after["mean_pregate_recall"],
        "mean_next_gate_recall": after["mean_next_gate_recall"],
        "mean_pregate_recall_at_init": before["mean_pregate_recall"],
        "next_token_first_layer_recall": after["next_token_first_layer_recall"],
        "next_token_first_layer_recall_at_init": before["next_token_first_layer_recall"],
        "first_distillation_loss": losses[0], "last_distillation_loss": losses[-1],
    }


# ---------------------------------------------------------------- the pre-gated model


def finetune_pregated(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int | None = None,
    seq_len: int | None = None,
    eval_batches: int = 8,
    control: bool = False,
    progress: bool = False,
) -> dict:
    """Fine-tune the pre-gated version of a moekit LM; validation loss before/after against the original.

    Writes a run directory out_dir/pregated-model (loadable with moekit.models.build.load_model,
    Engine.load or `moekit generate`, which apply the pre-gated routing).
    control=True also fine-tunes the original model with the same recipe (not
    saved), so the change can be told apart from the effect of more training.
    """
    import tempfile

    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"finetune steps={steps!r} is invalid: it must be an integer >= 1")
    started = time.perf_counter()
    run = Path(out_dir) / PREGATED_MODEL_DIR
    if run.exists() and any(run.glob("step-*")):
        raise ConfigError(f"{run} already holds a pre-gated model: choose another --out")
    job = _FineTune(checkpoint, steps, lr, batch_size, seq_len, eval_batches)
    original = job.val_loss()
    apply_pregated_routing(job.model)
    zero_shot = job.val_loss()
    result = job.fit(run, progress, pregated=True)
    tuned = job.val_loss()
    report = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "finetune_steps": steps, "lr": lr,
        "val_loss_original": original,
        "val_loss_pregated_zero_shot": zero_shot,
        "val_loss_pregated_finetuned": tuned,
        "val_loss_change": (tuned - original) / original,
        "val_loss_change_zero_shot": (zero_shot - original) / original,
        "model_dir": str(run),
    }
    if control:
        ctl = _FineTune(checkpoint, steps, lr, batch_size, seq_len, eval_batches)
        with tempfile.TemporaryDirectory(prefix="moekit-control-") as tmp:
            ctl.fit(Path(tmp) / "run", progress)
        report["val_loss_original_finetuned"] = ctl.val_loss()
        report["val_loss_change_vs_control"] = (tuned - report["val_loss_original_finetuned"]) / report["val_loss_original_finetuned"]
    report["seconds"] = time.perf_counter() - started
    (run / PREGATED_MARKER).write_text(json.dumps({"pregated": True, **report}, indent=2) + "\n")
    if result.checkpoint is None:
        raise CheckpointError(f"fine-tuning the pre-gated model wrote no checkpoint in {run}")
    return report


class _FineTune:
    """A short fine-tune of a moekit LM on its own corpus (the recipe shared by the pre-gated model and its control)."""

    def __init__(self, checkpoint, steps, lr, batch_size, seq_len, eval_batches):
        from .lm import load_lm, prepare_data

        self.model, self.tokenizer, self.cfg = load_lm(checkpoint)
        c = self.cfg.train
        self.tc = replace(c, steps=steps, lr=lr, warmup_steps=max(1, steps // 10), eval_every=0, save_every=0,
                          batch_size=batch_size or c.batch_size, seq_len=seq_len or c.seq_len,
                          eval_batches=eval_batches, keep_last=1, seed=c.seed + 7)
        self.data = prepare_data(self.cfg.data, self.tc.seq_len, self.tokenizer)

    def val_loss(self) -> float:
        from .lm import evaluate

        return evaluate(self.model, self.data.val, self.tc, self.cfg.model)["val_loss"]

    def fit(self, run: Path, progress: bool, pregated: bool = False):
        from ..config import to_dict
        from ..data.text import batch_at
        from ..models.decoder import lm_loss
        from .loop import fit

        tc, data = self.tc, self.data

        def batch_fn(i):
            return batch_at(data.train, i, tc.batch_size, tc.seq_len, tc.seed)

        def loss_fn(m, batch):
            x, y = batch
            loss, parts = lm_loss(m(x), y, tc.balance_loss_weight, tc.z_loss_weight)
            return loss, {k: float(v.detach()) for k, v in parts.items()}

        self.model.train()
        result = fit(self.model, tc, batch_fn=batch_fn, loss_fn=loss_fn, run_dir=run,
                     config_dict=to_dict(replace(self.cfg, train=tc, model=replace(self.cfg.model, pregated=pregated))), tokenizer=self.tokenizer, progress=progress)
        self.model.eval()
        return result


def format_report(report: dict) -> str:
    """A short table of a `train_pregate` report (and a `finetune_pregated` one under "pregated_model")."""
    lines = ["layer  next-gate recall  pre-gate recall"]
    for row in report["layers"]:
        lines.append(f"{row['layer']:>5}  {row['next_gate_recall']:>16.3f}  {row['pregate_recall']:>15.3f}")
    lines.append(f" mean  {report['mean_next_gate_recall']:>16.3f}  {report['mean_pregate_recall']:>15.3f}")
    if report.get("next_token_first_layer_recall") is not None:
        lines.append(f"first MoE layer of the next token (from the last layer's input): recall "
                     f"{report['next_token_first_layer_recall']:.3f} (router of the first layer on it: "
                     f"{report['next_token_first_layer_recall_at_init']:.3f})")
    ft = report.get("pregated_model")
    if ft:
        lines.append(
            f"pre-gated model: validation loss {ft['val_loss_original']:.4f} (original) -> "
            f"{ft['val_loss_pregated_zero_shot']:.4f} (rewired, no fine-tune) -> {ft['val_loss_pregated_finetuned']:.4f} "
            f"after {ft['finetune_steps']} steps ({100 * ft['val_loss_change']:+.2f}%); model: {ft['model_dir']}"
        )
        if "val_loss_original_finetuned" in ft:
            lines.append(f"  control: the original fine-tuned the same way reaches {ft['val_loss_original_finetuned']:.4f} "
                         f"({100 * ft['val_loss_change_vs_control']:+.2f}% for the pre-gated model against it)")
    return "\n".join(lines)
