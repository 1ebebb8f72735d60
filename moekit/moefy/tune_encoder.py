"""Light tuning of a converted sentence encoder: distillation to the dense model's embeddings.

The MoE FFNs (experts, shared slices, output biases) are trained so that the
converted encoder's mean-pooled embedding of each sentence points where the
dense encoder's does (loss 1 - cosine); routers keep their choices (the
selector's top-k has no gradient). Runs through `moekit.train.loop.fit`.
Nothing here is needed to build or load a model.
"""

from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F

from ..train.loop import TrainConfig, fit


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
                      save_every=0, keep_last=1, weight_decay=0.0, seed=seed)
    try:
        with tempfile.TemporaryDirectory() as run:
            return fit(moe, cfg, batch_fn=batch, loss_fn=loss_fn, run_dir=run, config_dict={}, progress=False).last_metrics
    finally:
        for n, p in moe.named_parameters():
            p.requires_grad_(flags[n])
        moe.eval()
