"""DecoderLM: FFN choices per layer, cached decode, parameter counts."""

import math

import pytest
import torch

from moekit.config import MoEConfig
from moekit.models.blocks import Block, ForwardCtx, MoDBlock
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


def tiny_cfg(**kw) -> ModelConfig:
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, kernel="loop")
    base = dict(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, max_seq_len=32, dense_hidden=24)
    return ModelConfig(moe=moe, **{**base, **kw})


def test_one_forward_context_is_built_once_and_shared_by_every_block():
    torch.manual_seed(0)
    model = DecoderLM(tiny_cfg(num_layers=3, mod_layers=[2]))
    rotary_calls, seen = [], []
    model.rotary.register_forward_hook(lambda m, args, out: rotary_calls.append(1))
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    out = model(torch.randint(0, 32, (2, 6)))
    assert len(rotary_calls) == 1 and len(seen) == 3 and all(ctx is seen[0] for ctx in seen)
    assert isinstance(seen[0], ForwardCtx) and seen[0].routings is out.routings and len(out.routings) == 3


def test_mixture_of_depths_block_equals_the_plain_block_on_the_chosen_tokens_alone():
    """MoD by key masks == gather the chosen tokens, run the plain block on them at their positions, mix by w."""
    torch.manual_seed(0)
    model = DecoderLM(tiny_cfg(mod_layers=[1], mod_capacity=0.5)).train()
    layer = model.layers[1]
    assert isinstance(layer, MoDBlock) and type(model.layers[0]) is Block
    torch.manual_seed(3)
    x = torch.randn(2, 10, 16)
    chosen, w, _ = layer.depth_router(x)
    cos, sin = model.rotary(torch.arange(10).expand(2, 10), x.dtype)
    got = layer(x, ForwardCtx(cos, sin, routings=[None, None]))
    for b in range(2):
        idx = chosen[b].nonzero().squeeze(-1)
        assert len(idx) == math.ceil(0.5 * 10)
        c, s = model.rotary(idx[None], x.dtype)
        new = Block.forward(layer, x[b:b + 1, idx], ForwardCtx(c, s, routings=[None, None]))[0]
        want = x[b].clone()
        want[idx] = x[b, idx] + w[b, idx, None] * (new - x[b, idx])
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)
        unchosen = ~chosen[b]
        assert torch.equal(got[b, unchosen], x[b, unchosen])
