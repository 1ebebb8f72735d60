"""Training a Read-ME model: router distillation alternating with expert tuning (moekit.train.loop.fit).

- Distillation: the decoupled router learns, from token ids alone, which
  experts the dense model's activations favour. The target is multi-level:
  in every layer the expert whose neurons carry the most activation mass
  (dense FFN inputs through the expert slices) gets one vote; the router's
  softmax is fitted to the layers' vote distribution.
- Expert tuning: the router frozen, the MoE FFNs (experts and shared part)
  trained on the language-model loss with the router's choices.

`train_decoupled` runs `rounds` of both; `decoupled_from_calib` is the CLI's
entry (calibration token ids in, a trained ReadMeLM out). Nothing here is
needed to build or load a model.
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F

from ..moe.experts import activate
from ..train.loop import TrainConfig, fit
from .plan import collect_ffn_inputs
from .readme_lm import ReadMeLM, make_readme_lm
from .spec import MoefyError


def token_stream(calib) -> torch.Tensor:
    parts = []
    for group in calib or []:
        for ids in group if isinstance(group, (list, tuple)) else [group]:
            parts.append(torch.as_tensor(ids).long().reshape(-1))
    if not parts:
        raise MoefyError("the decoupled router is trained on calibration text: give --calib PATH ...")
    return torch.cat(parts)


def window_batch_fn(stream: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
    seq_len = min(seq_len, stream.numel() - 1)
    if seq_len < 2:
        raise MoefyError(f"calibration text of {stream.numel()} tokens is too short to train on")

    def batch(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=g)
        return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])

    return batch


@torch.no_grad()
def vote_targets(dense, model: ReadMeLM, ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, T, E] the share of layers in which each expert has the largest activation mass (dense inputs)."""
    mlps = [layer.mlp for layer in dense.layers]
    (inputs,) = collect_ffn_inputs(mlps, [[(lambda: dense(ids_BT), None)]])
    E = model.router.cfg.num_experts
    votes = torch.zeros(ids_BT.numel(), E)
    for x_TD, layer in zip(inputs, model.lm.layers):
        exp = layer.mlp.experts
        mass_TE = torch.stack([activate(x_TD @ exp.w_in_EHD[e].float().T, exp.activation).abs().sum(-1) for e in range(E)], 1)
        votes += F.one_hot(mass_TE.argmax(-1), E).float()
    return (votes / len(inputs)).view(*ids_BT.shape, E)


def _phase_config(steps: int, lr: float, batch_size: int, seq_len: int, seed: int, model: torch.nn.Module) -> TrainConfig:
    """A tuning phase trains where the model already is (the dense teacher stays beside it): never `auto`."""
    return TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=min(5, steps),
                       eval_every=0, save_every=0, keep_last=1, weight_decay=0.0, seed=seed,
                       device=next(model.parameters()).device.type)


def distill_router(dense, model: ReadMeLM, batch_fn, cfg: TrainConfig) -> dict:
    def batch(step):
        ids = batch_fn(step)[:, :-1]
        return ids, vote_targets(dense, model, ids)

    def loss_fn(router, b):
        ids, target = b
        logp = router(ids).float().log_softmax(-1)
        loss = -(target * logp).sum(-1).mean()
        agree = (logp.argmax(-1) == target.argmax(-1)).float().mean()
        return loss, {"agreement": float(agree)}

    with tempfile.TemporaryDirectory() as run:
        return fit(model.router, cfg, batch_fn=batch, loss_fn=loss_fn, run_dir=run, config_dict={}, progress=False).last_metrics


def tune_experts(model: ReadMeLM, batch_fn, cfg: TrainConfig) -> dict:
    """LM loss with the router frozen; only the MoE FFNs train."""
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("lm.") and ".mlp." in n)

    def loss_fn(m, b):
        logits = m(b[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), b[:, 1:].flatten()), {}

    try:
        with tempfile.TemporaryDirectory() as run:
            return fit(model, cfg, batch_fn=batch_fn, loss_fn=loss_fn, run_dir=run, config_dict={}, progress=False).last_metrics
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])


def train_decoupled(dense, model: ReadMeLM, stream: torch.Tensor, rounds: int = 2, steps: int = 50, batch_size: int = 8,
                    seq_len: int = 64, router_lr: float = 3e-3, expert_lr: float = 3e-4, seed: int = 0) -> list[dict]:
    """`rounds` of (router distillation, expert tuning); returns each phase's last metrics."""
    batch_fn = window_batch_fn(stream, batch_size, seq_len, seed)
    log = []
    for r in range(rounds):
        log.append({"round": r, "phase": "distill", **distill_router(dense, model, batch_fn, _phase_config(steps, router_lr, batch_size, seq_len, seed + r, model))})
        log.append({"round": r, "phase": "experts", **tune_experts(model, batch_fn, _phase_config(steps, expert_lr, batch_size, seq_len, seed + r, model))})
    return log


def decoupled_from_calib(dense, moe, calib, rounds: int = 2, steps: int = 50) -> ReadMeLM:
    """A ReadMeLM around a converted (fixed-router) decoder, trained on the calibration token ids."""
    if not hasattr(moe, "lm_head"):
        raise MoefyError("the decoupled router is implemented for decoder language models; encoders use --router per-layer")
    model = make_readme_lm(moe)
    train_decoupled(dense, model, token_stream(calib), rounds=rounds, steps=steps)
    return model.eval()


def tune_decoder_layerwise(moe, dense, ids_BT: torch.Tensor, steps: int = 200, lr: float = 1e-3,
                           batch_tokens: int = 1024, seed: int = 0) -> list[float]:
    """Layer by layer, fit each MoE FFN (router frozen) to the dense FFN on the inputs the MoE model produces there."""
    from .tune_encoder import fit_ffn

    moe.eval()
    log = []
    for i, layer in enumerate(moe.layers):
        (inputs,) = collect_ffn_inputs([layer.mlp], [[(lambda: moe(ids_BT), None)]])
        x_TD = inputs[0]
        with torch.no_grad():
            y_TD = dense.layers[i].mlp(x_TD[None])[0].float()
        log.append(fit_ffn(layer.mlp, x_TD, y_TD, steps, lr, batch_tokens, seed + i, run=lambda m, x: m(x[None])[0][0]))
    return log


def distill_decoder(moe, dense, batch_fn, steps: int, batch_size: int, seq_len: int, lr: float = 3e-4, seed: int = 0) -> dict:
    """Tune the MoE FFNs (routers frozen) on next-token loss plus KL to the dense model's predictions."""
    trainable = {n: p.requires_grad for n, p in moe.named_parameters()}
    for n, p in moe.named_parameters():
        p.requires_grad_(".mlp." in n and ".router." not in n)

    def loss_fn(m, b):
        x, y = b
        with torch.no_grad():
            teacher = dense(x).logits.float().log_softmax(-1)
        logp = m(x).logits.float().log_softmax(-1)
        ce = F.nll_loss(logp.flatten(0, 1), y.flatten())
        kl = F.kl_div(logp, teacher, log_target=True, reduction="none").sum(-1).mean()
        return ce + kl, {"ce": float(ce.detach()), "kl": float(kl.detach())}

    cfg = _phase_config(steps, lr, batch_size, seq_len, seed, moe)
    try:
        with tempfile.TemporaryDirectory() as run:
            return fit(moe, cfg, batch_fn=batch_fn, loss_fn=loss_fn, run_dir=run, config_dict={}, progress=False).last_metrics
    finally:
        for n, p in moe.named_parameters():
            p.requires_grad_(trainable[n])
        moe.eval()
