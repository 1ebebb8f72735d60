"""Tests for moekit.modules: RMSNorm, RoPE, attention, masks, KV cache and dense MLPs.

The oracle is Hugging Face transformers' own modules (Llama, Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE) with weights copied in by name, plus hand-built references for
GQA and GELU. No MoE layers here (see test_layers.py).
"""

import math

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.mixtral.modeling_mixtral import MixtralAttention
from transformers.models.olmoe.modeling_olmoe import OlmoeAttention
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeAttention
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention, Qwen3MoeRotaryEmbedding

from moekit.errors import ConfigError
from moekit.modules import (
    Attention,
    GeluMLP,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rotary,
    build_mlp,
    causal_mask,
)

ATOL = 1e-5
HIDDEN, HEADS, KV_HEADS = 64, 4, 2


def _common(**extra):
    kw = dict(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        num_hidden_layers=1,
        vocab_size=60000,  # only sizes a config here; large enough for every family's special ids
        rms_norm_eps=1e-6,
        attn_implementation="eager",
    )
    kw.update(extra)
    return kw


# Each family: (HF config, HF attention class, moekit Attention kwargs).
FAMILIES = {
    "llama": (LlamaConfig(**_common()), LlamaAttention, {}),
    "mixtral": (MixtralConfig(**_common(rope_theta=1e6)), MixtralAttention, {}),
    "qwen2_moe": (Qwen2MoeConfig(**_common()), Qwen2MoeAttention, {"qkv_bias": True}),
    "qwen3_moe": (Qwen3MoeConfig(**_common(head_dim=24)), Qwen3MoeAttention, {"qk_norm": "head", "head_dim": 24}),
    "olmoe": (OlmoeConfig(**_common()), OlmoeAttention, {"qk_norm": "full"}),
}


def _pair(family: str, seed: int = 0):
    """An HF attention and a moekit Attention holding the same (random) weights."""
    config, hf_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    hf = hf_cls(config, 0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and "norm" in _name_of(hf, p) else 0.0))
    ours = Attention(HIDDEN, HEADS, KV_HEADS, norm_eps=config.rms_norm_eps, **kwargs).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # same parameter names, one to one
    theta = config.rope_parameters["rope_theta"]
    return hf, ours, config, RotaryEmbedding(ours.head_dim, theta)


def _name_of(module, param):
    return next(n for n, p in module.named_parameters() if p is param)


def _hf_rope(config):
    return LlamaRotaryEmbedding(config) if isinstance(config, LlamaConfig) else Qwen3MoeRotaryEmbedding(config)


# ---------------------------------------------------------------- norm and rope


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_hf_bitwise(dtype):
    torch.manual_seed(0)
    ours, hf = RMSNorm(48, eps=1e-5), LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(48))
        hf.weight.copy_(ours.weight)
    ours, hf = ours.to(dtype), hf.to(dtype)
    x = (torch.randn(3, 7, 48) * 5).to(dtype)
    assert torch.equal(ours(x), hf(x))


def test_rmsnorm_hand_computed():
    x = torch.tensor([[3.0, 4.0]])
    norm = RMSNorm(2, eps=0.0)
    rms = math.sqrt((9 + 16) / 2)
    assert torch.allclose(norm(x), torch.tensor([[3 / rms, 4 / rms]]))


@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_rotary_tables_match_hf(theta):
    config = Qwen3MoeConfig(**_common(head_dim=32, rope_theta=theta))
    positions = torch.tensor([[0, 1, 2, 3, 100], [5, 6, 7, 8, 4095]])
    x = torch.zeros(2, 5, HIDDEN)
    cos_hf, sin_hf = Qwen3MoeRotaryEmbedding(config)(x, positions)
    cos, sin = RotaryEmbedding(32, theta)(positions)
    assert cos.shape == (2, 5, 32)
    assert torch.equal(cos, cos_hf) and torch.equal(sin, sin_hf)


def test_rotary_preserves_norm_and_relative_positions():
    rope = RotaryEmbedding(16)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        rq, _ = apply_rotary(q, q, cq, sq)
        _, rk = apply_rotary(k, k, ck, sk)
        return (rq * rk).sum()

    # RoPE makes q.k depend only on the distance between positions.
    assert torch.allclose(score(3, 1), score(10, 8), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


# ---------------------------------------------------------------- attention vs transformers


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attention_matches_hf_causal(family):
    hf, ours, config, rope = _pair(family)
    torch.manual_seed(1)
    x = torch.randn(2, 9, HIDDEN)
    positions = torch.arange(9)[None].expand(2, 9)
    hf_mask = create_causal_mask(config=config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=positions)
    with torch.no_grad():
        expected, _ = hf(x, _hf_rope(config)(x, positions), hf_mask)
        cos, sin = rope(positions)
        got = ours(x, cos, sin)
    assert (got - expected).abs().max() < ATOL


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "qwen2_moe"])
def test_attention_matches_hf_with_left_padding(family):
    hf, ours, config, rope = _pair(family)
    torch.manual_seed(2)
    x = torch.randn(2, 7, HIDDEN)
    attention_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hf_mask = create_causal_mask(
        config=config, inputs_embeds=x, attention_mask=attention_mask, cache=None, position_ids=positions
    )
    with torch.no_grad():
        expected, _ = hf(x, _hf_rope(config)(x, positions), hf_mask)
        cos, sin = rope(positions)
        got = ours(x, cos, sin, attn_mask=causal_mask(7, 7, 0, attention_mask == 0))
    real = attention_mask.bool()
    assert torch.isfinite(got).all()
    assert (got[real] - expected[real]).abs().max() < ATOL


# ---------------------------------------------------------------- masks


def test_causal_mask_matches_hf_sdpa_mask_on_real_queries():
    config = Qwen3MoeConfig(**_common(attn_implementation="sdpa"))
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    x = torch.zeros(2, 5, HIDDEN)
    positions = torch.arange(5)[None].expand(2, 5)
    hf = create_causal_mask(config=config, inputs_embeds=x, attention_mask=attention_mask, cache=None, position_ids=positions)
    ours = causal_mask(5, 5, 0, attention_mask == 0)
    assert ours.shape == (2, 1, 5, 5) and ours.dtype == torch.bool
    real = attention_mask.bool()
    assert torch.equal(ours[:, 0][real], hf[:, 0][real])
    # A padding query may only see itself, so its row is never empty.
    assert torch.equal(ours[0, 0, 0], torch.tensor([True, False, False, False, False]))


def test_causal_mask_with_offset_hand_computed():
    mask = causal_mask(2, 5, 3)
    assert mask.shape == (1, 1, 2, 5)
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


# ---------------------------------------------------------------- cache, padding, GQA


def _module(seed=0, **kwargs):
    torch.manual_seed(seed)
    m = Attention(HIDDEN, HEADS, KV_HEADS, qk_norm="head", **kwargs).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def test_cached_decode_equals_full_forward():
    attn, rope = _module(), RotaryEmbedding(HIDDEN // HEADS)
    torch.manual_seed(3)
    x = torch.randn(2, 10, HIDDEN)
    cos, sin = rope(torch.arange(10)[None].expand(2, 10))
    with torch.no_grad():
        full = attn(x, cos, sin)
        cache = KVCache(2, 1, KV_HEADS, 16, HIDDEN // HEADS)
        # prefill 4, then a chunk of 2 (multi-token write at an offset), then one token at a time
        pieces = [(0, 4), (4, 6)] + [(t, t + 1) for t in range(6, 10)]
        outs = [attn(x[:, a:b], cos[:, a:b], sin[:, a:b], kv_cache=cache, cache_start=a) for a, b in pieces]
    assert cache.length == 10
    assert (torch.cat(outs, dim=1) - full).abs().max() < ATOL


def test_left_padded_batch_equals_each_sequence_alone():
    attn, rope = _module(seed=4), RotaryEmbedding(HIDDEN // HEADS)
    torch.manual_seed(5)
    short, long = torch.randn(1, 3, HIDDEN), torch.randn(1, 6, HIDDEN)
    pad = torch.zeros(1, 3, HIDDEN)
    batch = torch.cat([torch.cat([pad, short], dim=1), long])
    key_padding = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    positions = ((~key_padding).long().cumsum(-1) - 1).clamp(min=0)
    cos, sin = rope(positions)
    with torch.no_grad():
        cache = KVCache(2, 1, KV_HEADS, 8, HIDDEN // HEADS)
        got = attn(batch, cos, sin, attn_mask=causal_mask(6, 6, 0, key_padding), kv_cache=cache)
        alone_short = attn(short, *rope(torch.arange(3)[None]))
        alone_long = attn(long, *rope(torch.arange(6)[None]))
        # one decode step after the padded prefill: the padding keys stay masked
        nxt = torch.randn(2, 1, HIDDEN)
        step_cos, step_sin = rope(positions[:, -1:] + 1)
        step_mask = causal_mask(1, 7, 6, torch.cat([key_padding, torch.zeros(2, 1, dtype=torch.bool)], dim=1))
        step = attn(nxt, step_cos, step_sin, attn_mask=step_mask, kv_cache=cache, cache_start=6)
        ref_short = attn(torch.cat([short, nxt[:1]], dim=1), *rope(torch.arange(4)[None]))[:, -1:]
    assert torch.isfinite(got).all()
    assert (got[0, 3:] - alone_short[0]).abs().max() < ATOL
    assert (got[1] - alone_long[0]).abs().max() < ATOL
    assert (step[0] - ref_short[0]).abs().max() < ATOL


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = _module(seed=6, qkv_bias=True)
    mha = Attention(HIDDEN, HEADS, HEADS, qk_norm="head", qkv_bias=True).eval()
    group, d = HEADS // KV_HEADS, HIDDEN // HEADS
    state = dict(gqa.state_dict())
    for name in ("k_proj", "v_proj"):
        # kv head j serves query heads j*group .. (j+1)*group-1
        w = state[f"{name}.weight"].view(KV_HEADS, d, HIDDEN).repeat_interleave(group, 0)
        state[f"{name}.weight"] = w.reshape(HEADS * d, HIDDEN)
        state[f"{name}.bias"] = state[f"{name}.bias"].view(KV_HEADS, d).repeat_interleave(group, 0).reshape(-1)
    mha.load_state_dict(state)
    torch.manual_seed(7)
    x = torch.randn(2, 5, HIDDEN)
    cos, sin = RotaryEmbedding(d)(torch.arange(5)[None].expand(2, 5))
    with torch.no_grad():
        assert (gqa(x, cos, sin) - mha(x, cos, sin)).abs().max() < ATOL
    assert gqa.k_proj.weight.shape == (KV_HEADS * d, HIDDEN)


def test_kv_cache_bookkeeping_and_overflow():
    cache = KVCache(1, 2, 1, 4, 2)
    k = torch.ones(1, 1, 3, 2)
    keys, values = cache.update(0, k, 2 * k, start=0)
    assert keys.shape == (1, 1, 3, 2) and torch.equal(values, 2 * k)
    assert cache.lengths == [3, 0] and cache.length == 0
    cache.update(1, k, k, start=0)
    assert cache.length == 3
    with pytest.raises(ConfigError, match="max_len=4"):
        cache.update(0, k, k, start=2)
    cache.reset()
    assert cache.length == 0 and cache.lengths == [0, 0]


def test_attention_rejects_bad_head_config():
    with pytest.raises(ConfigError, match="num_kv_heads=3"):
        Attention(64, 4, 3)
    with pytest.raises(ConfigError, match="qk_norm"):
        Attention(64, 4, 2, qk_norm="layer")


# ---------------------------------------------------------------- dense MLPs


def test_swiglu_matches_hf_llama_mlp():
    config = LlamaConfig(**_common(intermediate_size=96, hidden_act="silu"))
    torch.manual_seed(8)
    hf = LlamaMLP(config)
    ours = SwiGLU(HIDDEN, 96)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(3, 4, HIDDEN)
    with torch.no_grad():
        assert (ours(x) - hf(x)).abs().max() < 1e-6


def test_gelu_mlp_is_exact_erf_gelu():
    torch.manual_seed(9)
    mlp = GeluMLP(8, 16)
    x = torch.randn(5, 8)
    h = x @ mlp.up_proj.weight.T
    expected = (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ mlp.down_proj.weight.T
    with torch.no_grad():
        assert (mlp(x) - expected).abs().max() < 1e-6


def test_build_mlp_names():
    assert isinstance(build_mlp("swiglu", 8, 16), SwiGLU)
    assert isinstance(build_mlp("gelu", 8, 16), GeluMLP)
    with pytest.raises(ConfigError, match="accepted values are swiglu, gelu"):
        build_mlp("relu", 8, 16)
