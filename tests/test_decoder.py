"""DecoderLM: FFN choices per layer, cached decode, parameter counts."""

import pytest
import torch

from moekit.config import MoEConfig
from moekit.models.decoder import DecoderLM, ModelConfig, count_parameters
from moekit.moe.layers import MoELayer, ResidualMoE
from moekit.modules import SwiGLU


def tiny(**kw):
    moe = kw.pop("moe", MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    base = dict(vocab_size=50, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, max_seq_len=64, dense_hidden=48)
    return ModelConfig(moe=moe, **{**base, **kw})


def test_ffn_kinds_pyramid_and_dense_layers():
    model = DecoderLM(tiny(first_k_dense=1, experts_per_layer=[4, 4, 4, 8]))
    kinds = [type(layer.mlp) for layer in model.layers]
    assert kinds == [SwiGLU, MoELayer, MoELayer, MoELayer]
    assert [l.mlp.cfg.num_experts for l in model.layers[1:]] == [4, 4, 8]
    model = DecoderLM(tiny(ffn="residual_moe", moe_layer_freq=2))
    assert [type(l.mlp) for l in model.layers] == [SwiGLU, ResidualMoE, SwiGLU, ResidualMoE]
    shared = DecoderLM(tiny(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, num_shared_experts=1, shared_expert_gate=True)))
    assert shared.layers[0].mlp.shared_gate is not None
    out = shared(torch.randint(0, 50, (2, 10)))
    assert out.logits.shape == (2, 10, 50) and set(out.aux_losses) == {"balance", "z"}


def test_tied_embeddings_share_one_tensor():
    model = DecoderLM(tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight


def test_cached_decode_equals_full_forward():
    torch.manual_seed(0)
    model = DecoderLM(tiny()).eval()
    ids = torch.randint(0, 50, (2, 12))
    full = model(ids).logits
    cache = model.new_cache(2, 12)
    steps = [model(ids[:, :7], kv_cache=cache, cache_start=0).logits]
    for t in range(7, 12):
        steps.append(model(ids[:, t : t + 1], kv_cache=cache, cache_start=t).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_parameter_counts_by_hand():
    cfg = tiny(num_layers=1)
    model = DecoderLM(cfg)
    counts = count_parameters(model)
    per_expert = 3 * 32 * 16
    attn = 32 * 32 * 2 + 2 * 32 * 16  # q, o: 32x32; k, v: 32 x (2 heads * 8)
    expected_total = 50 * 32 * 2 + attn + 32 * 4 + 4 * per_expert + 3 * 32  # embed+head, attn, router, experts, norms
    assert counts["total"] == expected_total
    assert counts["active"] == expected_total - 2 * per_expert


def test_context_length_is_checked():
    model = DecoderLM(tiny())
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_unknown_ffn_and_pyramid_length_are_named():
    with pytest.raises(ValueError, match="ffn"):
        tiny(ffn="sparse")
    with pytest.raises(ValueError, match="experts_per_layer"):
        tiny(experts_per_layer=[4, 8])
