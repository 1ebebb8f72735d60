"""DeepSeek-V2 / V3 in moekit.hf, checked against transformers itself, and the MLA latent cache.

Tiny random models are built with transformers (odd sizes, sharded saves);
moekit must give the same logits on a padded batch, the same greedy tokens as
`generate`, cached decode equal to a full forward, and an export that
transformers reloads to the same logits. The latent cache's absorbed decode
must equal expanded attention; FP8 block dequantization is checked against
values computed by hand.
"""

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from moekit import hf  # noqa: E402
from moekit.errors import CheckpointError  # noqa: E402
from moekit.hf import fp8  # noqa: E402
from moekit.infer import Engine  # noqa: E402
from moekit.models.mla import LatentKVCache, MLAConfig, cache_bytes_per_token  # noqa: E402

from hf_helpers import (PROMPTS, cached_decode_against_full_forward, export_round_trip, family_fixture,  # noqa: E402
                        greedy_against_generate, logit_gap, moekit_logits, padded, tiny_hf)

VOCAB = 97
MLA = dict(kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10)
FAMILIES = {
    # V3: low-rank q, sigmoid + correction bias, 2 of 4 groups by top-2 sum, routed scaling, one dense layer, YaRN
    "deepseek_v3": dict(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, q_lora_rank=24,
                        first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 32, "mscale": 1.0, "mscale_all_dim": 1.0,
                                         "beta_fast": 32, "beta_slow": 1}),
    # V2-Lite-like: full-rank q, softmax, group-limited greedy by each group's best, 2 shared experts
    "deepseek_v2": dict(n_routed_experts=6, num_experts_per_tok=2, q_lora_rank=None, first_k_dense_replace=1,
                        n_shared_experts=2, topk_method="group_limited_greedy", n_group=3, topk_group=2,
                        routed_scaling_factor=1.5, norm_topk_prob=False),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def build_hf(family, seed=0, **overrides):
    base = dict(vocab_size=VOCAB, hidden_size=36, intermediate_size=44, moe_intermediate_size=12, num_hidden_layers=3,
                num_attention_heads=3, max_position_embeddings=128, initializer_range=0.1, eos_token_id=None,
                bos_token_id=None, pad_token_id=0, **MLA)
    model = tiny_hf(family, base, FAMILIES[family], overrides, seed)
    with torch.no_grad():  # norms and the correction bias away from their defaults, so a mapping mistake shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.3, 0.3)
    return model


family_dir = family_fixture(build_hf, FAMILIES, max_shard_size="30KB")


def test_logits_match_transformers_on_a_padded_batch(family_dir):
    family, ref, path = family_dir
    model = hf.load(path)
    assert model.cfg.attention == "mla" and not model.layers[0].is_moe and model.layers[1].is_moe
    assert logit_gap(ref, model) <= 1e-4


def test_greedy_generation_equals_transformers_generate(family_dir):
    family, ref, path = family_dir
    greedy_against_generate(ref, path)


def test_cached_decode_equals_full_forward(family_dir):
    family, ref, path = family_dir

    def latent_cache(cache, B, P):
        assert isinstance(cache, LatentKVCache) and cache.latents[0].shape == (B, P, 20 + 6)

    cached_decode_against_full_forward(path, inspect_cache=latent_cache)


def test_export_then_reload_round_trips(family_dir, tmp_path):
    family, ref, path = family_dir
    model = hf.load(path)
    out = hf.save(model, tmp_path / "exported", arch="auto", max_shard_bytes=30_000)
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    export_round_trip(ref, out)


def test_moekit_checkpoint_state_keeps_the_v3_correction_bias(family_dir):
    from moekit.models.build import build_model, load_state

    family, ref, path = family_dir
    model = hf.load(path)
    state = model.state_dict()
    if family == "deepseek_v3":
        torch.testing.assert_close(state["layers.1.mlp.router.expert_bias"], ref.model.layers[1].mlp.gate.e_score_correction_bias)
    again = build_model(model.cfg, empty=True)
    load_state(again, state)
    ids, mask = padded(PROMPTS)
    assert torch.equal(moekit_logits(again.eval(), ids, mask), moekit_logits(model, ids, mask))


def test_offloaded_generation_reads_deepseek_experts_from_disk(family_dir):
    family, ref, path = family_dir
    want = [c.token_ids for c in Engine.load(path).generate(PROMPTS[:2], max_new_tokens=8, temperature=0)]
    engine = Engine.load(path)
    offloader = engine.offload("50%", tier="disk", predictor="next-gate")
    try:
        assert [c.token_ids for c in engine.generate(PROMPTS[:2], max_new_tokens=8, temperature=0)] == want
    finally:
        offloader.close()


# ---------------------------------------------------------------- the latent cache


@torch.no_grad()
def test_absorbed_latent_attention_equals_expanded_attention():
    from moekit.models.mla import MLARotaryEmbedding, MLAttention

    torch.manual_seed(3)
    mla = MLAConfig(q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
    attn = MLAttention(20, 3, mla).eval()
    rotary = MLARotaryEmbedding(mla, 10000.0)
    x = torch.randn(2, 9, 20)
    cos, sin = rotary(torch.arange(9).expand(2, 9))
    attn.absorb = "never"
    full = attn(x, cos, sin)  # causal, per-head keys and values
    cache = LatentKVCache(2, 1, 9, mla.latent_dim)
    attn.absorb = "decode"
    out = [attn(x[:, :5], cos[:, :5], sin[:, :5], None, cache, 0, 0)]
    for t in range(5, 9):  # each one-token step attends over the cached latents, up-projections absorbed
        out.append(attn(x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], None, cache, 0, t))
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.lengths == [9] and cache.nbytes() == 2 * 9 * (10 + 4) * 4


def test_cache_bytes_per_token_against_transformers_cache():
    ref = build_hf("deepseek_v3")
    c = ref.config
    mla = MLAConfig(q_lora_rank=24, **MLA)
    sizes = cache_bytes_per_token(c.num_hidden_layers, c.num_attention_heads, mla, dtype_bytes=4)
    # by hand: 3 layers x (20 + 6) fp32 numbers; per-head K/V: 3 layers x 3 heads x ((8 + 6) + 10)
    assert sizes == {"latent": 3 * 26 * 4, "per_head_kv": 3 * 3 * 24 * 4}
    with torch.no_grad():
        cache = ref(input_ids=torch.tensor([PROMPTS[0]]), use_cache=True).past_key_values
    measured = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    # transformers 5's DynamicCache already keeps the compressed latents for these models
    assert measured // len(PROMPTS[0]) == sizes["latent"]


# ---------------------------------------------------------------- MTP, FP8, refusals


def _write_fp8(path, ref):
    """ref's checkpoint with q_b_proj of layer 1 stored as FP8 in 8x8 blocks; returns its dequantized value."""
    from safetensors.torch import load_file, save_file

    ref.save_pretrained(path)
    state = load_file(str(path / hf.SINGLE_FILE))
    name = "model.layers.1.self_attn.q_b_proj.weight"  # [3 heads x 14, 24]: 42 rows -> 6 blocks, the last partial
    w = state[name]
    scale = torch.rand(6, 3) + 0.5
    q = torch.empty_like(w)
    for i in range(6):
        for j in range(3):
            q[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8] = w[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8] / scale[i, j]
    state[name] = q.to(torch.float8_e4m3fn)
    state[name + "_scale_inv"] = scale
    # the MTP layer of a real V3 checkpoint: layer index == num_hidden_layers
    state["model.layers.3.eh_proj.weight"] = torch.zeros(36, 72)
    save_file(state, str(path / hf.SINGLE_FILE))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [8, 8]}
    (path / "config.json").write_text(json.dumps(cfg))
    expected = torch.empty_like(w)
    fp = state[name].float()
    for i in range(6):
        for j in range(3):
            expected[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8] = fp[i * 8:(i + 1) * 8, j * 8:(j + 1) * 8] * scale[i, j]
    return name, expected


def test_fp8_block_checkpoint_is_dequantized_and_mtp_layers_ignored(tmp_path):
    ref = build_hf("deepseek_v3")
    name, expected = _write_fp8(tmp_path / "m", ref)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = hf.load(tmp_path / "m")
    notes = [w for w in caught if "multi-token-prediction" in str(w.message)]
    assert len(notes) == 1
    got = model.layers[1].self_attn.q_b_proj.weight
    assert torch.equal(got, expected)
    assert 0 < (got - ref.model.layers[1].self_attn.q_b_proj.weight).abs().max() < 0.1  # FP8 rounding, nothing worse


def test_fp8_dequantize_by_hand():
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.5, -1.0], [2.0, -2.0, 1.5]]).to(torch.float8_e4m3fn)
    scale = torch.tensor([[2.0, 10.0], [0.5, 3.0]])
    want = torch.tensor([[2.0, 4.0, 30.0], [8.0, 1.0, -10.0], [1.0, -1.0, 4.5]])
    assert torch.equal(fp8.dequantize(w, scale, (2, 2)), want)
    with pytest.raises(CheckpointError, match=r"needs \[2, 2\]"):
        fp8.dequantize(w, scale[:1], (2, 2), "x")


def test_unsupported_deepseek_features_are_refused_by_name(tmp_path):
    path = tmp_path / "m"
    build_hf("deepseek_v2").save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cases = [({"topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
             ({"moe_layer_freq": 2}, "moe_layer_freq=2"),
             ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type='longrope'"),
             ({"quantization_config": {"quant_method": "awq"}}, "quant_method='awq'")]
    for change, message in cases:
        (path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(hf.UnsupportedModelError, match=message):
            hf.load(path)


# ---------------------------------------------------------------- moekit-built MLA models


def _native_mla(**moe):
    from moekit.config import MoEConfig
    from moekit.models.decoder import DecoderLM, ModelConfig

    torch.manual_seed(2)
    moe = {**dict(num_experts=4, top_k=2, expert_hidden=12, score_func="sigmoid", n_group=2, topk_group=1,
                  num_shared_experts=1, routed_scaling_factor=2.5), **moe}
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=36, num_layers=2, num_heads=3, num_kv_heads=3, max_seq_len=64,
                      dense_hidden=44, first_k_dense=1, attention="mla", mla=MLAConfig(q_lora_rank=16, **MLA),
                      moe=MoEConfig(**moe))
    return DecoderLM(cfg).eval()


def test_moekit_mla_model_exports_to_transformers_with_the_same_logits(tmp_path):
    model = _native_mla()
    with torch.no_grad():
        model.layers[1].mlp.router.expert_bias.uniform_(-0.2, 0.2)
    out = hf.save(model, tmp_path / "v3", arch="auto")
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v3"
    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    assert logit_gap(ref, model) <= 1e-4


def test_mla_config_survives_moekit_checkpoint_config_and_gqa_families_refuse_it(tmp_path):
    from dataclasses import asdict

    from moekit.config import from_dict
    from moekit.models.decoder import ModelConfig

    model = _native_mla()
    assert from_dict(ModelConfig, asdict(model.cfg)) == model.cfg
    with pytest.raises(hf.UnsupportedModelError, match="attention='mla'"):
        hf.save(model, tmp_path / "a", arch="mixtral")
    with pytest.raises(hf.UnsupportedModelError, match="score_func='sigmoid'.*'softmax'"):
        hf.save(model, tmp_path / "b", arch="deepseek_v2")
    assert not any(tmp_path.iterdir())


def test_bf16_loading_keeps_yarn_tables_in_float32(family_dir):
    family, ref, path = family_dir
    model = hf.load(path, dtype="bfloat16")
    assert model.rotary.inv_freq.dtype == torch.float32
    fresh = hf.load(path).rotary.inv_freq
    assert torch.equal(model.rotary.inv_freq, fresh)
    # transformers' own bf16 load is the reference (its fp32 logits differ from it by ~0.6 here: routing flips)
    ref_bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, experts_implementation="eager").eval()
    ids, mask = padded(PROMPTS)
    with torch.no_grad():
        expected = ref_bf16(input_ids=ids, attention_mask=mask).logits.float()
    got = moekit_logits(model, ids, mask).float()
    assert torch.isfinite(got).all() and (got - expected)[mask.bool()].abs().max() < 0.1
