"""moefy.convert on moekit DecoderLMs: upcycle step-0 equality, slicing equals masking, Read-ME split."""

import pytest
import torch
import torch.nn.functional as F

from moekit.models.build import build_model
from moekit.models.decoder import ModelConfig
from moekit.moefy import MoefyError, convert


def dense_lm(activation="swiglu", seed=0):
    from moekit.config import MoEConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=128,
                      ffn="dense", dense_hidden=64, moe=MoEConfig(activation=activation, num_experts=2, top_k=1, expert_hidden=8))
    model = build_model(cfg).eval()
    for p in model.parameters():  # larger than the 0.02 init so that differences show
        p.data.normal_(0, 0.3) if p.dim() > 1 else None
    return model


def hand_ffn(mlp, x, mask=None):
    """The dense FFN by hand, with neurons outside `mask` zeroed."""
    if hasattr(mlp, "gate_proj"):
        a = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    else:
        a = F.gelu(x @ mlp.up_proj.weight.T)
    if mask is not None:
        a = a * mask
    return a @ mlp.down_proj.weight.T


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_upcycle_step0_equals_dense(activation):
    dense = dense_lm(activation)
    moe = convert(dense, method="upcycle", experts=4, top_k=2)
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        x = torch.randn(7, 32)
        y, routing = moe.layers[0].mlp(x)
        assert routing.expert_idx_N.numel() == 7 * 2  # really top-2 of 4
        torch.testing.assert_close(y, hand_ffn(dense.layers[0].mlp, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_cluster_slicing_equals_masking(activation):
    dense = dense_lm(activation)
    moe = convert(dense, method="cluster", experts=4, top_k=2)
    x = torch.randn(9, 32)
    for layer_d, layer_m in zip(dense.layers, moe.layers):
        exp = layer_m.mlp.experts
        covered = torch.zeros(64)
        with torch.no_grad():
            for e in range(4):
                # which dense neurons expert e holds: find its up rows among the dense up rows
                up_rows = exp.w_in_EHD[e, -16:] if activation == "swiglu" else exp.w_in_EHD[e]
                idx = torch.cdist(up_rows, layer_d.mlp.up_proj.weight).argmin(1)
                mask = torch.zeros(64)
                mask[idx] = 1
                covered += mask
                y = exp(x, torch.tensor([9 if i == e else 0 for i in range(4)]), kernel="loop")
                torch.testing.assert_close(y, hand_ffn(layer_d.mlp, x, mask), rtol=1e-5, atol=1e-5)
        assert torch.equal(covered, torch.ones(64))  # balanced: 16 each, every neuron once


def test_cluster_all_experts_is_dense_and_topk_routes_k():
    dense = dense_lm()
    full = convert(dense, method="cluster", experts=4, top_k=4)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(full(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
        sparse = convert(dense, method="cluster", experts=4, top_k=1)
        out = sparse(ids)
    assert all(r.expert_idx_N.numel() == 20 for r in out.routings)


def test_readme_shared_part_and_equality_with_all_experts():
    dense = dense_lm()
    calib = [torch.randint(0, 25, (4, 32)), torch.randint(25, 50, (4, 32))]  # two "domains"
    moe = convert(dense, method="readme", experts=4, top_k=4, shared_fraction=0.25, calib=calib)
    layer = moe.layers[0].mlp
    assert layer.shared.up_proj.weight.shape == (16, 32) and layer.experts.w_out_EDF.shape == (4, 32, 12)
    ids = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
        x = torch.randn(5, 32)
        # the shared part is a slice too: masking the dense FFN to its neurons
        s_idx = torch.cdist(layer.shared.up_proj.weight, dense.layers[0].mlp.up_proj.weight).argmin(1)
        mask = torch.zeros(64)
        mask[s_idx] = 1
        torch.testing.assert_close(layer.shared(x), hand_ffn(dense.layers[0].mlp, x, mask), rtol=1e-5, atol=1e-5)


def test_bad_requests():
    dense = dense_lm()
    with pytest.raises(MoefyError, match="top-k"):
        convert(dense, method="upcycle", experts=2, top_k=3)
    with pytest.raises(MoefyError, match="do not divide"):
        convert(dense, method="cluster", experts=5, top_k=1)
    with pytest.raises(MoefyError, match="calibration"):
        convert(dense, method="readme", experts=4, top_k=1)
    with pytest.raises(MoefyError, match="already has MoE"):
        convert(convert(dense, method="upcycle", experts=2, top_k=1), method="upcycle", experts=2, top_k=1)


def test_save_copies_a_moekit_runs_tokenizer_from_its_checkpoint(tmp_path):
    """Issue 25: moefy.save(..., source=RUN_DIR) copied no tokenizer (it lives in the run's step-* checkpoint)."""
    import warnings

    from moekit import moefy
    from moekit.checkpoints import resolve_checkpoint
    from moekit.models.build import load_model
    from moekit.train.lm import resolve_run_config, train_lm

    (tmp_path / "data.txt").write_text("def add(a, b):\n    return a + b\n" * 200)
    cfg = resolve_run_config("tiny", overrides=["train.steps=1", "train.eval_every=0", "train.save_every=1", "train.seq_len=32",
                                                "train.device=cpu", "model.ffn=dense"], data=str(tmp_path / "data.txt"))
    run = tmp_path / "run"
    train_lm(cfg, run, progress=False)
    moe = moefy.convert(load_model(run)[0], method="upcycle", experts=4, top_k=2)
    out = moefy.save(moe, tmp_path / "out", source=run)
    assert (out / "tokenizer.json").read_bytes() == (resolve_checkpoint(run) / "tokenizer.json").read_bytes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moefy.save(moe, tmp_path / "out2", source=tmp_path)  # no tokenizer anywhere: said, not silent
    assert any("holds no tokenizer" in str(w.message) for w in caught)
