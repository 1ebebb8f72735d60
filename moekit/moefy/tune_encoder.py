"""Light tuning of a converted sentence encoder: layer-wise FFN matching, then distillation to the dense embeddings.

- `tune_layerwise`: layer by layer, each MoE FFN (experts, shared slice,
  output bias; router frozen) is regressed onto the dense FFN's outputs on the
  inputs the converted model itself produces at that layer (`fit_ffn`, Adam);
  `oracle_sets` gives the experts a greedy oracle would pick per token.
- `distill_encoder`: end to end, the converted encoder's mean-pooled
  embedding of each sentence is pulled toward the dense encoder's (loss
  1 - cosine), through `moekit.train.loop.fit`; routers keep their choices.

Nothing here is needed to build or load a model.
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F

from ..train.loop import TrainConfig, fit
from .routers import fit_selector


def distill_encoder(moe, dense, sentences: list[str], steps: int = 40, batch_size: int = 16, lr: float = 1e-4, seed: int = 0) -> dict:
    """Tune `moe` in place toward `dense`'s embeddings; returns the last step's metrics."""
    with torch.no_grad():
        targets = dense.encode(sentences, batch_size=64)
    flags = {n: p.requires_grad for n, p in moe.named_parameters()}
    for n, p in moe.named_parameters():
        p.requires_grad_(".ffn." in n and ".router." not in n)

    def batch(step: int):
        g = torch.Generator().manual_seed(seed * 7919 + step)
        pick = torch.randint(0, len(sentences), (batch_size,), generator=g).tolist()
        return moe.tokenize([sentences[i] for i in pick]), targets[pick]

    def loss_fn(model, b):
        tok, target = b
        h = model(tok["input_ids"], tok["attention_mask"], tok.get("token_type_ids"))
        m = tok["attention_mask"][..., None].to(h.dtype)
        emb = F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=1)
        cos = (emb * target).sum(-1)
        return (1 - cos).mean(), {"cosine": float(cos.detach().mean())}

    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=8, lr=lr, warmup_steps=min(5, steps), eval_every=0,
                      save_every=0, keep_last=1, weight_decay=0.0, seed=seed,
                      device=next(moe.parameters()).device.type)  # where the model is (the teacher beside it)
    try:
        with tempfile.TemporaryDirectory() as run:
            return fit(moe, cfg, batch_fn=batch, loss_fn=loss_fn, run_dir=run, config_dict={}, progress=False).last_metrics
    finally:
        for n, p in moe.named_parameters():
            p.requires_grad_(flags[n])
        moe.eval()


@torch.no_grad()
def _ffn_inputs(layer, xs, masks):
    """Each batch's FFN input [B, T, D] and the real tokens' rows [N, D]."""
    hs = [layer.attend(x, m[:, None, None, :].bool()) for x, m in zip(xs, masks)]
    return hs, torch.cat([h[m.bool()] for h, m in zip(hs, masks)])


def fit_ffn(ffn, x_TD: torch.Tensor, y_TD: torch.Tensor, steps: int, lr: float, batch_tokens: int, seed: int,
            run=None) -> float:
    """Regress one MoE FFN (router frozen) onto the dense FFN's outputs y_TD; returns the last relative MSE.

    run(ffn, x_TD) -> [T, D] calls the FFN (default: ffn(x_TD)).
    """
    run = run or (lambda m, x: m(x))
    params = [p for n, p in ffn.named_parameters() if not n.startswith("router.")]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    scale = y_TD.var(0).sum().clamp_min(1e-12)
    loss = torch.tensor(0.0)
    with torch.enable_grad():
        for _ in range(steps):
            pick = torch.randint(0, x_TD.shape[0], (min(batch_tokens, x_TD.shape[0]),), generator=g)
            loss = (run(ffn, x_TD[pick]) - y_TD[pick]).square().sum(-1).mean() / scale
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return float(loss.detach())


@torch.no_grad()
def oracle_sets(ffn, x_TD: torch.Tensor, y_TD: torch.Tensor, k: int) -> torch.Tensor:
    """[T, E] 1 for the k experts a greedy oracle picks per token (each step the expert that most reduces the error)."""
    E = ffn.experts.num_experts
    out = torch.zeros(x_TD.shape[0], E)
    for s in range(0, x_TD.shape[0], 2048):
        x = x_TD[s : s + 2048]  # every token through every expert: E groups of all the rows
        ys = ffn.experts(x.repeat(E, 1), torch.full((E,), x.shape[0]), kernel="loop").view(E, x.shape[0], -1).transpose(0, 1)
        res = y_TD[s : s + 2048] - ffn.b_out_D - (ffn.shared_out(F.gelu(ffn.shared_in(x))) if ffn.shared_in is not None else 0)
        chosen = out[s : s + 2048]
        for _ in range(k):
            err = (res[:, None] - ys).square().sum(-1).masked_fill(chosen.bool(), float("inf"))
            e = err.argmin(1)
            chosen[torch.arange(len(e)), e] = 1.0
            res = res - ys[torch.arange(len(e)), e]
    return out


def tune_layerwise(moe, dense, sentences: list[str], steps: int = 200, lr: float = 1e-3, batch_tokens: int = 1024,
                   seed: int = 0, refit_router: bool = False) -> list[float]:
    """Layer by layer, fit each MoE FFN to the dense FFN on the inputs the MoE model itself produces there.

    Hidden-state matching: layer i is fitted on what layers 0..i-1, already
    fitted, hand it, so errors do not compound unseen. refit_router: first refit
    a selector to the experts `oracle_sets` picks on those inputs (measured on
    MiniLM: no gain over the calibration-fitted selector, so off by default).
    Returns each layer's last relative MSE.
    """
    moe.eval()
    toks = [moe.tokenize(sentences[i : i + 32]) for i in range(0, len(sentences), 32)]
    masks = [t["attention_mask"] for t in toks]
    with torch.no_grad():
        xs = [moe.embed(t["input_ids"], t.get("token_type_ids")) for t in toks]
    log = []
    for i, layer in enumerate(moe.encoder.layer):
        hs, x_TD = _ffn_inputs(layer, xs, masks)
        with torch.no_grad():
            y_TD = dense.encoder.layer[i].ffn(x_TD)
        if refit_router and hasattr(layer.ffn.router, "net"):
            fit_selector(layer.ffn.router, x_TD, oracle_sets(layer.ffn, x_TD, y_TD, layer.ffn.router.top_k), seed=seed + i)
        log.append(fit_ffn(layer.ffn, x_TD, y_TD, steps, lr, batch_tokens, seed + i))
        with torch.no_grad():
            xs = [layer.finish(h, layer.ffn(h)) for h in hs]
    return log
