"""The dense-LM part of benchmarks/moefy.py: a moekit LM trained on the stdlib, converted with Read-ME at 50% FFN active.

A dense DecoderLM is trained by `moekit train`'s own recipe (`train_lm`, the
Python standard library's source as text, byte tokens); it is converted with
`moefy.convert(method="readme", experts=8, top_k=4)` (4 of 8 expert slices =
50% of the FFN per token, selector routers), calibrated on 8 domains cut from
the training stream; then tuned with at most 10% of the dense run's training
tokens: layer-wise FFN matching on calibration activations, then next-token
loss plus KL to the dense model. Validation loss (the recipe's held-out files)
before and after tuning, as a ratio to the dense model's; as a peer, the dense
model given the same tuning (its FFNs, the same tokens, loss and steps).

Not here: the MiniLM part (moefy.py), timing.
"""

from __future__ import annotations

import copy
import tempfile
import time

import torch


def lm_setup(quick: bool) -> dict:
    from moekit.config import MoEConfig
    from moekit.models.decoder import ModelConfig
    from moekit.train.lm import DataConfig, RunConfig, TrainConfig

    steps = 60 if quick else 400
    model = ModelConfig(vocab_size=257, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=4, max_seq_len=256,
                        ffn="dense", dense_hidden=512, moe=MoEConfig(activation="swiglu"))
    train = TrainConfig(steps=steps, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=min(30, steps), eval_every=0,
                        eval_batches=16, save_every=0, keep_last=1)
    return {"run": RunConfig(model, train, DataConfig(max_bytes=1_500_000)), "tune_fraction": 0.10}


def calibration_domains(train_tokens: torch.Tensor, domains: int = 8, tokens_per_domain: int = 2048) -> list[torch.Tensor]:
    """`domains` windows spread over the training stream (the stdlib files come in order, so they differ in topic)."""
    n = train_tokens.numel()
    starts = torch.linspace(0, n - tokens_per_domain - 1, domains).long().tolist()
    return [train_tokens[s : s + tokens_per_domain] for s in starts]


def run_lm(quick: bool) -> dict:
    from moekit import moefy
    from moekit.data.text import batch_at
    from moekit.moefy.tune import distill_decoder, tune_decoder_layerwise
    from moekit.train.lm import evaluate, prepare_data, train_lm

    setup = lm_setup(quick)
    cfg, tc = setup["run"], setup["run"].train
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        trained = train_lm(cfg, out, progress=False)
    dense, mcfg = trained["model"].eval(), trained["config"].model
    data = prepare_data(cfg.data, tc.seq_len)
    train_tokens = tc.steps * tc.batch_size * tc.seq_len
    val = lambda m: evaluate(m, data.val, tc, mcfg)["val_loss"]  # noqa: E731
    dense_loss = val(dense)
    row = {"dense_train_tokens": train_tokens, "dense_train_seconds": time.perf_counter() - t0, "dense_val_loss": dense_loss}

    calib = calibration_domains(data.train)
    moe = moefy.convert(dense, method="readme", experts=8, top_k=4, calib=calib)
    row["readme_val_loss_before"] = val(moe)
    budget = int(setup["tune_fraction"] * train_tokens)
    rows = min(sum(c.numel() for c in calib), budget // 2) // tc.seq_len
    ids_BT = torch.cat(calib)[: rows * tc.seq_len].view(rows, tc.seq_len)
    layer_tokens = ids_BT.numel()  # the layer-wise fit reuses these calibration tokens' activations
    tune_decoder_layerwise(moe, dense, ids_BT, steps=60 if quick else 300)
    row["readme_val_loss_layerwise"] = val(moe)
    kd_batch = 16
    kd_steps = max(1, (budget - layer_tokens) // (kd_batch * tc.seq_len))
    batch_fn = lambda i: batch_at(data.train, i, kd_batch, tc.seq_len, tc.seed + 17)  # noqa: E731
    distill_decoder(moe, dense, batch_fn, steps=kd_steps, batch_size=kd_batch, seq_len=tc.seq_len, lr=1e-3)
    row["readme_val_loss_after"] = val(moe)
    peer = copy.deepcopy(dense)  # the same tuning recipe on the dense model's own FFNs: what the extra tokens alone buy
    distill_decoder(peer, dense, batch_fn, steps=kd_steps, batch_size=kd_batch, seq_len=tc.seq_len, lr=1e-3)
    row["dense_tuned_val_loss"] = val(peer)
    row["tune_tokens"] = layer_tokens + kd_steps * kd_batch * tc.seq_len
    row["tune_fraction_of_training"] = row["tune_tokens"] / train_tokens
    row["ratio_before"] = row["readme_val_loss_before"] / dense_loss
    row["ratio_after"] = row["readme_val_loss_after"] / dense_loss
    row["seconds"] = time.perf_counter() - t0
    row["model"] = {"hidden": mcfg.hidden_size, "layers": mcfg.num_layers, "ffn_width": mcfg.dense_hidden,
                    "experts": 8, "top_k": 4, "ffn_active": 0.5, "router": "per-layer selector", "source": data.source}
    return row
