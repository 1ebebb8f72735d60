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
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CheckpointError, ConfigError, MoekitError

HEADS_FILE = "pregate.safetensors"
REPORT_FILE = "pregate.json"
PREGATED_MARKER = "pregated.json"
PREGATED_MODEL_DIR = "pregated-model"


class PreGateError(MoekitError):
    """Pre-gate heads or a pre-gated model that cannot be used with this model."""


def _moe_layers(model: nn.Module) -> list:
    from .layers import MoELayer

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise PreGateError("the model has no MoE layers, so there is nothing to pre-gate")
    return layers


# ---------------------------------------------------------------- heads


class PreGateHeads(nn.Module):
    """heads[str(i)]: Linear(D, E_{i+1}) from MoE layer i's input to MoE layer i+1's expert logits."""

    def __init__(self, hidden_sizes: list[int], num_experts: list[int], bias: bool = False):
        super().__init__()
        self.heads = nn.ModuleDict(
            {str(i): nn.Linear(hidden_sizes[i], num_experts[i + 1], bias=bias) for i in range(len(num_experts) - 1)}
        )

    @classmethod
    def from_model(cls, model: nn.Module) -> "PreGateHeads":
        """Heads initialised from the next layer's router: at step 0 they are the next-gate predictor."""
        layers = _moe_layers(model)
        if len(layers) < 2:
            raise PreGateError("the model has a single MoE layer: there is no next layer to pre-gate")
        if any(m.cfg.router == "expert_choice" for m in layers):
            raise PreGateError("pre-gate heads predict token-choice routing; this model uses the expert_choice router")
        gates = [m.router.gate for m in layers]
        heads = cls([m.cfg.hidden_size for m in layers], [m.cfg.num_experts for m in layers], bias=gates[0].bias is not None)
        with torch.no_grad():
            for i, head in heads.heads.items():
                nxt = gates[int(i) + 1]
                head.weight.copy_(nxt.weight)
                if head.bias is not None:
                    head.bias.copy_(nxt.bias)
        return heads.to(gates[0].weight.device)

    def forward(self, layer: int, x_TD: torch.Tensor) -> torch.Tensor:
        return self.heads[str(layer)](x_TD)


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
    sums = {"pregate": [0.0] * (len(layers) - 1), "next_gate": [0.0] * (len(layers) - 1)}
    try:
        for x in batches:
            model(x)
            for i in range(len(layers) - 1):
                true_TK = tap.topk[i + 1]
                if heads is not None:
                    sums["pregate"][i] += topk_recall(heads(i, tap.inputs[i]), true_TK)
                sums["next_gate"][i] += topk_recall(_router_selection_logits(layers[i + 1].router, tap.inputs[i]), true_TK)
    finally:
        tap.remove()
    n = max(len(batches), 1)
    rows = []
    for i in range(len(layers) - 1):
        row = {"layer": i + 1, "next_gate_recall": sums["next_gate"][i] / n}
        if heads is not None:
            row["pregate_recall"] = sums["pregate"][i] / n
        rows.append(row)
    return {"layers": rows,
            "mean_next_gate_recall": sum(r["next_gate_recall"] for r in rows) / max(len(rows), 1),
            "mean_pregate_recall": (sum(r["pregate_recall"] for r in rows) / max(len(rows), 1)) if heads is not None else None}


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
    """Train pre-gate heads for a moekit LM checkpoint by distillation; write DIR/pregate.{safetensors,json}."""
    from .data.text import batch_at
    from .lm import load_lm, prepare_data

    for name, value, lo in (("steps", steps, 1), ("batch_size", batch_size, 1), ("seq_len", seq_len, 2), ("eval_batches", eval_batches, 1)):
        if not isinstance(value, int) or value < lo:
            raise ConfigError(f"{name}={value!r} is invalid: it must be an integer >= {lo}")
    if not lr > 0:
        raise ConfigError(f"lr={lr} is invalid: it must be > 0")
    started = time.perf_counter()
    model, tokenizer, cfg = load_lm(checkpoint)
    seq_len = min(seq_len, cfg.model.max_seq_len)
    data = prepare_data(cfg.data, seq_len, tokenizer)
    model.eval().requires_grad_(False)
    layers = _moe_layers(model)
    heads = PreGateHeads.from_model(model)
    val = [batch_at(data.val, i, batch_size, seq_len, seed + 1_000_003)[0] for i in range(eval_batches)]
    before = measure_recall(model, heads, val)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=0.0)
    tap = _RouterTap(layers)
    losses = []
    try:
        for step in range(steps):
            x, _ = batch_at(data.train, step, batch_size, seq_len, seed + 17)
            with torch.no_grad():
                model(x)
            for group in optimizer.param_groups:  # cosine decay to 10%
                group["lr"] = lr * (0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi * step / steps)).item()))
            loss = sum(distill_loss(heads(i, tap.inputs[i]), tap.logits[i + 1]) for i in range(len(layers) - 1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if progress and (step + 1) % max(1, steps // 10) == 0:
                print(f"pregate step {step + 1}/{steps} distillation loss {losses[-1]:.4f}", flush=True)
    finally:
        tap.remove()
    after = measure_recall(model, heads, val)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr,
        "top_k": [m.cfg.top_k for m in layers],
        "num_experts": [m.cfg.num_experts for m in layers],
        "hidden_size": [m.cfg.hidden_size for m in layers],
        "layers": after["layers"],
        "mean_pregate_recall": after["mean_pregate_recall"],
        "mean_next_gate_recall": after["mean_next_gate_recall"],
        "mean_pregate_recall_at_init": before["mean_pregate_recall"],
        "first_distillation_loss": losses[0], "last_distillation_loss": losses[-1],
        "seconds": time.perf_counter() - started,
    }
    from .checkpoints import save_tensors

    save_tensors(out / HEADS_FILE, {k: v.detach().cpu() for k, v in heads.state_dict().items()})
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    report["out_dir"] = str(out)
    return report


def load_pregate_heads(directory: str | Path, model: nn.Module) -> PreGateHeads:
    """Heads written by `train_pregate`, checked against `model`'s MoE layers."""
    d = Path(directory)
    if not (d / HEADS_FILE).is_file() or not (d / REPORT_FILE).is_file():
        raise PreGateError(f"{d} holds no pre-gate heads ({HEADS_FILE} + {REPORT_FILE}); train them with `moekit pregate CKPT --out {d}`")
    try:
        report = json.loads((d / REPORT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PreGateError(f"{d / REPORT_FILE} cannot be read: {e}") from None
    layers = _moe_layers(model)
    want = ([m.cfg.hidden_size for m in layers], [m.cfg.num_experts for m in layers])
    have = (report.get("hidden_size"), report.get("num_experts"))
    if list(have) != list(want):
        raise PreGateError(
            f"the pre-gate heads in {d} were trained for MoE layers with hidden sizes {have[0]} and experts {have[1]}, "
            f"but this model has {want[0]} and {want[1]}"
        )
    from .checkpoints import load_tensors

    state, _ = load_tensors(d / HEADS_FILE)
    first = layers[0].router.gate
    heads = PreGateHeads(want[0], want[1], bias=any(k.endswith(".bias") for k in state))
    try:
        heads.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PreGateError(f"{d / HEADS_FILE} does not match this model: {e}") from None
    return heads.to(device=first.weight.device, dtype=first.weight.dtype).eval().requires_grad_(False)


def load_pregate_predictor(directory: str | Path, model: nn.Module):
    """The `pregate` predictor of moekit.infer.prefetch, from a directory written by `moekit pregate`."""
    if model is None:
        raise PreGateError("the pregate predictor needs the model to check the heads against")
    from .infer.prefetch import LearnedPreGate

    heads = load_pregate_heads(directory, model)
    return LearnedPreGate(heads.heads, [m.cfg.top_k for m in _moe_layers(model)])


# ---------------------------------------------------------------- the pre-gated model


class PreGatedRouting:
    """Makes MoE layer i+1 route on MoE layer i's input (parameter names unchanged).

    Both ways a router is asked are rewired: its forward (a pre-hook swaps
    the input) and its `select` (the generation engine's decode path; an
    instance attribute wraps the class's method).
    """

    def __init__(self, model: nn.Module):
        self.layers = _moe_layers(model)
        if len(self.layers) < 2:
            raise PreGateError("the model has a single MoE layer: there is no next layer to pre-gate")
        self._inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles = [m.router.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(self.layers)]
        for i, m in enumerate(self.layers):
            if hasattr(type(m.router), "select"):
                m.router.select = self._select(i, m.router)
        model._moekit_pregated = self

    def _swap(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Remember layer i's own input; return the input layer i routes on."""
        self._inputs[i] = x
        if i == 0:
            return x
        prev = self._inputs[i - 1]
        if prev is None or prev.shape != x.shape:
            raise RuntimeError(f"pre-gated routing: MoE layer {i} ran before layer {i - 1} in this forward pass")
        self._inputs[i - 1] = None
        return prev

    def _hook(self, i):
        def hook(module, args, kwargs):
            if args:
                return (self._swap(i, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "x_TD": self._swap(i, kwargs["x_TD"])}
        return hook

    def _select(self, i, router):
        method = type(router).select

        def select(x_TD, *args, **kwargs):
            return method(router, self._swap(i, x_TD), *args, **kwargs)
        return select

    def remove(self, model: nn.Module | None = None) -> None:
        for h in self.handles:
            h.remove()
        for m in self.layers:
            m.router.__dict__.pop("select", None)
        if model is not None and getattr(model, "_moekit_pregated", None) is self:
            del model._moekit_pregated


def apply_pregated_routing(model: nn.Module) -> PreGatedRouting:
    """Rewire `model` so each MoE layer after the first routes on the previous MoE layer's input."""
    if getattr(model, "_moekit_pregated", None) is not None:
        raise PreGateError("the model already routes with pre-gating")
    return PreGatedRouting(model)


def is_pregated(path: str | Path) -> bool:
    """Whether a run or checkpoint directory holds a pre-gated model (written by `finetune_pregated`)."""
    p = Path(path)
    return (p / PREGATED_MARKER).is_file() or (p.is_dir() and (p.parent / PREGATED_MARKER).is_file())


def load_lm_any(path: str | Path):
    """load_lm, rewired with pre-gated routing when the checkpoint is a pre-gated model."""
    from .lm import load_lm

    model, tokenizer, cfg = load_lm(path)
    if is_pregated(path):
        apply_pregated_routing(model)
    return model, tokenizer, cfg


def finetune_pregated(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int | None = None,
    seq_len: int | None = None,
    eval_batches: int = 8,
    progress: bool = False,
) -> dict:
    """Fine-tune the pre-gated version of a moekit LM; validation loss before/after against the original.

    Writes a run directory out_dir/pregated-model (loadable with load_lm_any
    or `moekit generate`, which apply the pre-gated routing).
    """
    from .config import to_dict
    from .data.text import batch_at
    from .decoder import lm_loss
    from .lm import evaluate, load_lm, prepare_data
    from .train import fit

    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"finetune steps={steps!r} is invalid: it must be an integer >= 1")
    started = time.perf_counter()
    model, tokenizer, cfg = load_lm(checkpoint)
    tc = replace(cfg.train, steps=steps, lr=lr, warmup_steps=max(1, steps // 10), eval_every=0, save_every=0,
                 batch_size=batch_size or cfg.train.batch_size, seq_len=seq_len or cfg.train.seq_len,
                 eval_batches=eval_batches, keep_last=1, seed=cfg.train.seed + 7)
    data = prepare_data(cfg.data, tc.seq_len, tokenizer)
    original = evaluate(model, data.val, tc, cfg.model)["val_loss"]
    apply_pregated_routing(model)
    zero_shot = evaluate(model, data.val, tc, cfg.model)["val_loss"]

    def batch_fn(i):
        return batch_at(data.train, i, tc.batch_size, tc.seq_len, tc.seed)

    def loss_fn(m, batch):
        x, y = batch
        loss, parts = lm_loss(m(x), y, tc.balance_loss_weight, tc.z_loss_weight)
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    run = Path(out_dir) / PREGATED_MODEL_DIR
    if run.exists() and any(run.glob("step-*")):
        raise ConfigError(f"{run} already holds a pre-gated model: choose another --out")
    model.train()
    result = fit(model, tc, batch_fn=batch_fn, loss_fn=loss_fn, run_dir=run, config_dict=to_dict(replace(cfg, train=tc)),
                 tokenizer=tokenizer, progress=progress)
    model.eval()
    tuned = evaluate(model, data.val, tc, cfg.model)["val_loss"]
    report = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "finetune_steps": steps, "lr": lr,
        "val_loss_original": original,
        "val_loss_pregated_zero_shot": zero_shot,
        "val_loss_pregated_finetuned": tuned,
        "val_loss_change": (tuned - original) / original,
        "model_dir": str(run),
        "seconds": time.perf_counter() - started,
    }
    (run / PREGATED_MARKER).write_text(json.dumps({"pregated": True, **report}, indent=2) + "\n")
    if result.checkpoint is None:
        raise CheckpointError(f"fine-tuning the pre-gated model wrote no checkpoint in {run}")
    return report


def format_report(report: dict) -> str:
    """A short table of a `train_pregate` report (and a `finetune_pregated` one under "pregated_model")."""
    lines = ["layer  next-gate recall  pre-gate recall"]
    for row in report["layers"]:
        lines.append(f"{row['layer']:>5}  {row['next_gate_recall']:>16.3f}  {row['pregate_recall']:>15.3f}")
    lines.append(f" mean  {report['mean_next_gate_recall']:>16.3f}  {report['mean_pregate_recall']:>15.3f}")
    ft = report.get("pregated_model")
    if ft:
        lines.append(
            f"pre-gated model: validation loss {ft['val_loss_original']:.4f} (original) -> "
            f"{ft['val_loss_pregated_zero_shot']:.4f} (rewired, no fine-tune) -> {ft['val_loss_pregated_finetuned']:.4f} "
            f"after {ft['finetune_steps']} steps ({100 * ft['val_loss_change']:+.2f}%); model: {ft['model_dir']}"
        )
    return "\n".join(lines)
