"""moekit.train.flops: FLOPs per token, compute to a loss level and MFU, counted by hand on tiny configs."""

import pytest

from moekit.config import MoEConfig
from moekit.models.decoder import DecoderLM, ModelConfig, count_parameters
from moekit.train import flops


def tiny(ffn: str, **kw) -> ModelConfig:
    # D=8, V=10, 2 layers, 2 query heads of dim 4; dense width 16 = top-2 x expert width 8
    moe = kw.pop("moe", MoEConfig(num_experts=4, top_k=2, expert_hidden=8))
    return ModelConfig(vocab_size=10, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=kw.pop("kv", 1),
                       max_seq_len=16, ffn=ffn, dense_hidden=16, moe=moe, **kw)


def test_training_flops_per_token_by_hand():
    # per layer attention: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; lm_head 8*10 = 80
    # dense FFN 3*8*16 = 384 -> 80 + 2*(192 + 384) = 1232; MoE: router 8*4 + 2*3*8*8 = 416 -> 80 + 2*(192 + 416) = 1296
    assert flops.active_matmul_params(tiny("dense")) == 1232
    assert flops.active_matmul_params(tiny("moe")) == 1296
    # attention: 6 * 2 layers * T=6 * d_attn 8 = 576
    assert flops.attention_flops_per_token(tiny("dense"), 6) == 576
    assert flops.training_flops_per_token(tiny("moe"), 6) == 6 * 1296 + 576
    assert flops.forward_flops_per_token(tiny("moe"), 6) == (6 * 1296 + 576) // 3


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_active_matmul_params_are_the_active_parameters_less_embeddings_and_norms(ffn):
    cfg = tiny(ffn)
    embedding, norms = cfg.vocab_size * cfg.hidden_size, (2 * cfg.num_layers + 1) * cfg.hidden_size
    assert flops.active_matmul_params(cfg) == count_parameters(DecoderLM(cfg))["active"] - embedding - norms


def test_routed_accounting_by_hand():
    # head 6*8*10 = 480; per layer 6 x (projections 4*8*8 = 256, scores+values 3*T6*8 = 144, FFN ...)
    assert flops.routed_training_flops_per_token(tiny("dense", kv=2), 6) == 480 + 2 * 6 * (256 + 144 + 3 * 8 * 16)
    # expert choice, capacity 1, 4 experts of 8, auxiliary routers of 3; layer 1 a depth layer (capacity 0.25, predictor 5)
    moe = MoEConfig(num_experts=4, expert_hidden=8, router="expert_choice", capacity_factor=1.0, aux_router_hidden=3)
    cfg = tiny("moe", kv=2, moe=moe, mod_layers=[1], mod_capacity=0.25, mod_predictor_hidden=5)
    layer = 256 + 144 + 3 * 8 * 8 + 8 * 4  # 624
    aux = 4 * (8 * 3 + 3)  # 108
    depth = 0.25 * layer + aux + 8 + 8 * 5 + 5
    assert flops.routed_training_flops_per_token(cfg, 6) == pytest.approx(480 + 6 * (layer + aux) + 6 * depth)


def test_crossing_flops_and_mfu():
    points = [(0, 5.0), (10, 3.0), (20, 2.0)]
    assert flops.crossing_flops(points, 2.5) == pytest.approx(15.0)
    assert flops.crossing_flops(points, 6.0) == 0 and flops.crossing_flops(points, 1.0) is None
    assert flops.mfu(tokens_per_s=1000, flops_per_token=6e6, peak_flops_per_s=1.2e10) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="peak_flops_per_s"):
        flops.mfu(1, 1, 0)
