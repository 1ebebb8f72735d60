"""Layer-wise tuning of converted models: the greedy oracle's expert choice, and FFN matching lowering the error."""

import pytest
import torch
import torch.nn.functional as F

from moekit.moefy import convert
from moekit.moefy.tune import distill_decoder, tune_decoder_layerwise
from test_moefy_convert import dense_lm, hand_ffn


def tiny_encoder(seed=0):
    """A random 2-layer BERT-style SentenceEncoder (no tokenizer needed for the FFN-level checks)."""
    from moekit.moefy.encoder import SentenceEncoder

    torch.manual_seed(seed)
    hf = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32, "num_hidden_layers": 2,
          "vocab_size": 1200, "max_position_embeddings": 64}
    enc = SentenceEncoder(hf).eval()
    for p in enc.parameters():
        p.data.normal_(0, 0.3) if p.dim() > 1 else None
    return enc


def test_oracle_k1_is_the_single_best_expert_by_masked_dense_ffn(one_thread):
    from moekit.moefy.tune_encoder import oracle_sets

    enc = tiny_encoder()
    moe = enc.convert_to_moe(__import__("moekit.moefy", fromlist=["MoefySpec"]).MoefySpec("cluster", 4, 1), None)
    ffn, dense_ffn = moe.encoder.layer[0].ffn, enc.encoder.layer[0].ffn
    x = torch.randn(40, 16)
    with torch.no_grad():
        y = dense_ffn(x)
        chosen = oracle_sets(ffn, x, y, 1)
        # independent: each expert = the dense FFN with only that expert's neurons kept (+ output bias)
        errs = []
        for e in range(4):
            mask = torch.zeros(32)
            neurons = [j for j in range(32) if any(torch.equal(ffn.experts.w_in_EHD[e][w], dense_ffn.up_proj.weight[j]) for w in range(8))]
            mask[neurons] = 1.0
            out = F.gelu(x @ dense_ffn.up_proj.weight.T + dense_ffn.up_proj.bias) * mask @ dense_ffn.down_proj.weight.T
            errs.append((y - out - dense_ffn.down_proj.bias).square().sum(-1))
    assert chosen.sum(1).eq(1).all()
    assert torch.equal(chosen.argmax(1), torch.stack(errs, 1).argmin(1))


@pytest.mark.parametrize("shared", [0.0, 0.25])
def test_oracle_sets_pick_k_distinct_experts(one_thread, shared):
    from moekit.moefy.spec import MoefySpec
    from moekit.moefy.tune_encoder import oracle_sets

    enc = tiny_encoder()
    ffn = enc.convert_to_moe(MoefySpec("cluster", 4, 3, shared_fraction=shared), None).encoder.layer[1].ffn
    x = torch.randn(25, 16)
    assert oracle_sets(ffn, x, enc.encoder.layer[1].ffn(x).detach(), 3).sum(1).eq(3).all()


def test_encoder_layerwise_fit_brings_ffns_and_hidden_states_closer(one_thread):
    from moekit.moefy.spec import MoefySpec
    from moekit.moefy.tune_encoder import tune_layerwise

    enc = tiny_encoder()
    moe = enc.convert_to_moe(MoefySpec("cluster", 4, 1), None)
    ids = torch.randint(1000, 1200, (6, 10))

    class Tok:  # tokenize() stand-in: fixed ids, all real tokens
        def __call__(self, sentences, **kw):
            i = torch.tensor([int(s) for s in sentences])
            return {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i])}

    moe.tokenizer = enc.tokenizer = Tok()
    err = lambda: float((moe(ids) - enc(ids)).detach().square().mean())  # noqa: E731
    before = err()
    log = tune_layerwise(moe, enc, [str(i) for i in range(6)], steps=60, lr=3e-3, batch_tokens=64)
    assert len(log) == 2 and all(0 <= v < 1 for v in log)
    assert err() < 0.5 * before


def test_decoder_layerwise_fit_and_distillation_approach_the_dense_lm(one_thread):
    torch.manual_seed(0)
    dense = dense_lm("swiglu")
    moe = convert(dense, method="readme", experts=4, top_k=2, calib=[torch.randint(0, 50, (64,)) for _ in range(4)])
    ids = torch.randint(0, 50, (16, 32))

    def kl():
        with torch.no_grad():
            return float(F.kl_div(moe(ids).logits.log_softmax(-1), dense(ids).logits.log_softmax(-1), log_target=True,
                                  reduction="batchmean"))

    from moekit.moefy.plan import collect_ffn_inputs

    held = torch.randint(0, 50, (2, 16))
    x = collect_ffn_inputs([dense.layers[0].mlp], [[(lambda: dense(held), None)]])[0][0]  # real layer-0 inputs, unseen ids
    ffn_err = lambda: float((moe.layers[0].mlp(x[None])[0][0] - hand_ffn(dense.layers[0].mlp, x)).detach().square().mean())  # noqa: E731
    before_kl, before_ffn = kl(), ffn_err()
    tune_decoder_layerwise(moe, dense, ids, steps=60, lr=1e-3, batch_tokens=256)
    assert ffn_err() < before_ffn and kl() < before_kl
    mid = kl()
    batch = lambda i: (ids[:, :-1], ids[:, 1:])  # noqa: E731
    metrics = distill_decoder(moe, dense, batch, steps=20, batch_size=16, seq_len=31, lr=1e-3)
    assert "kl" in metrics and kl() < mid
