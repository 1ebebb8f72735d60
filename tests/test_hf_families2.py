"""Granite-MoE, PhiMoE and GPT-OSS checkpoints, checked against transformers itself.

Each family: a tiny random model built by transformers (odd sizes, every
quirk switched on, biases / sinks / norms randomised so a mapping mistake
shows), saved in shards; moekit must give the same logits on a padded batch,
the same 32 greedy tokens as `generate`, cached decode equal to a full
forward, and an export that transformers reloads to the same logits. Also:
expert biases in every kernel (against a per-token hand computation),
MXFP4 dequantization (by hand and against transformers' own converter),
offloading, and refusals by name.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from moekit import hf  # noqa: E402
from moekit.cli.generate import HF_ARCHS  # noqa: E402
from moekit.config import MoEConfig  # noqa: E402
from moekit.errors import ConfigError, MoekitError  # noqa: E402
from moekit.hf.mxfp4 import dequantize_mxfp4  # noqa: E402
from moekit.infer import Engine  # noqa: E402
from moekit.models.decoder import DecoderLM, ModelConfig  # noqa: E402
from moekit.moe.experts import Experts  # noqa: E402

from hf_helpers import (PROMPTS, cached_decode_against_full_forward, export_round_trip, family_fixture,  # noqa: E402
                        greedy_against_generate, logit_gap, moekit_logits, padded, tiny_hf)

VOCAB = 97
FAMILIES = {
    "granitemoe": dict(embedding_multiplier=3.0, residual_multiplier=0.6, attention_multiplier=0.2, logits_scaling=2.5,
                       attention_bias=True, num_experts_per_tok=3),
    # LongRoPE: generation crosses original_max_position_embeddings. Equal mscales, as Phi-3.5-MoE ships them
    # (with different ones transformers' generate re-prefills at the crossing: see the longrope test below).
    "phimoe": dict(attention_bias=True, lm_head_bias=True, router_jitter_noise=0.3, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.3, 1.7, 2.2, 3.1], long_factor=[2.0, 3.0, 4.0, 5.0, 6.0],
        short_mscale=1.25, long_mscale=1.25, original_max_position_embeddings=20)),
    "gpt_oss": dict(head_dim=12, sliding_window=5, num_hidden_layers=3, swiglu_limit=1.5, rope_parameters=dict(
        rope_type="yarn", rope_theta=150000.0, factor=8.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
        original_max_position_embeddings=16)),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def build_hf(family, seed=0, **overrides):
    base = dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=28,  # 28: transformers grouped_mm needs 16-byte rows
                num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, eos_token_id=None,
                bos_token_id=None, pad_token_id=0, num_local_experts=5, num_experts_per_tok=2)
    model = tiny_hf(family, base, FAMILIES[family], overrides, seed)
    with torch.no_grad():  # biases, sinks and norms away from their init, so a mapping mistake would show
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.2)
            elif p.dim() <= 2 and (name.endswith(("bias", "sinks"))):
                p.normal_(0, 0.3)
    return model


family_dir = family_fixture(build_hf, FAMILIES, max_shard_size="60KB")


def test_logits_match_transformers_on_a_padded_batch(family_dir):
    family, ref, path = family_dir
    model = hf.load(path)
    assert logit_gap(ref, model) <= 1e-4


def test_greedy_generation_equals_transformers_generate(family_dir):
    family, ref, path = family_dir
    greedy_against_generate(ref, path)


def test_cached_decode_equals_full_forward(family_dir):
    family, ref, path = family_dir
    cached_decode_against_full_forward(path)


def test_export_then_reload_round_trips(family_dir, tmp_path):
    family, ref, path = family_dir
    model = hf.load(path)
    out = hf.save(model, tmp_path / "exported", arch=family, max_shard_bytes=50_000)
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    export_round_trip(ref, out)


def test_longrope_mscale_switches_with_the_longest_position(tmp_path):
    """transformers' PhiMoE keeps the short factors and switches only the mscale once a position passes the original length."""
    rope = {**FAMILIES["phimoe"]["rope_parameters"], "short_mscale": 1.1, "long_mscale": 1.4}
    ref = build_hf("phimoe", rope_parameters=rope)
    ref.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="short_mscale != long_mscale.*recomputes the whole cache"):
        model = hf.load(tmp_path)
    ids = torch.randint(1, VOCAB, (1, 30))
    with torch.no_grad():
        for T in (12, 30):  # below and above original_max_position_embeddings=20
            expected = ref(input_ids=ids[:, :T]).logits
            got = model(ids[:, :T]).logits
            assert (got - expected).abs().max() <= 1e-4
        cos_short, _ = model.rotary(torch.arange(12)[None])
        cos_long, _ = model.rotary(torch.arange(30)[None])
    assert torch.allclose(cos_short[0, 0], torch.full_like(cos_short[0, 0], 1.1))
    assert torch.allclose(cos_long[0, 0], torch.full_like(cos_long[0, 0], 1.4))


# ---------------------------------------------------------------- expert biases and the clamped SwiGLU in every kernel


def _by_hand(x_ND, counts, experts, alpha, limit):
    """Token by token, the GPT-OSS expert formula written out (gate rows first, then up rows)."""
    out, F = [], experts.w_out_EDF.shape[2]
    expert_of = torch.repeat_interleave(torch.arange(len(counts)), counts)
    for x, e in zip(x_ND, expert_of.tolist()):
        h = experts.w_in_EHD[e] @ x + experts.b_in_EH[e]
        gate, up = h[:F].clamp(max=limit), h[F:].clamp(-limit, limit)
        act = (up + 1) * gate * torch.sigmoid(alpha * gate)
        out.append(experts.w_out_EDF[e] @ act + experts.b_out_ED[e])
    return torch.stack(out)


@pytest.mark.parametrize("activation", ["clamped_swiglu", "swiglu"])
def test_expert_biases_in_every_kernel(activation):
    torch.manual_seed(0)
    experts = Experts(4, 16, 8, activation=activation, bias=True, swiglu_alpha=1.3, swiglu_limit=0.7)
    with torch.no_grad():
        experts.b_in_EH.normal_(0, 0.5)
        experts.b_out_ED.normal_(0, 0.5)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 16) * 3  # large enough that the clamp bites
    with torch.no_grad():
        results = {k: experts(x, counts, kernel=k) for k in ("loop", "bmm", "grouped_mm")}
    if activation == "clamped_swiglu":
        with torch.no_grad():
            torch.testing.assert_close(results["loop"], _by_hand(x, counts, experts, 1.3, 0.7), atol=1e-5, rtol=1e-5)
    for k in ("bmm", "grouped_mm"):
        torch.testing.assert_close(results[k], results["loop"], atol=1e-5, rtol=1e-5)
    grads = {}
    for k in ("loop", "bmm", "grouped_mm"):
        experts.zero_grad()
        xg = x.clone().requires_grad_(True)
        (experts(xg, counts, kernel=k) * torch.linspace(-1, 1, 16)).sum().backward()
        grads[k] = [xg.grad] + [p.grad.clone() for p in experts.parameters()]
    for k in ("bmm", "grouped_mm"):
        for a, b in zip(grads[k], grads["loop"]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_clamped_swiglu_experts_need_biases():
    with pytest.raises(ConfigError, match="expert_biases=true"):
        MoEConfig(activation="clamped_swiglu")
    with pytest.raises(ConfigError, match="GPT-OSS.*offload"):
        Experts(4, 16, 8, activation="clamped_swiglu")


# ---------------------------------------------------------------- MXFP4


def test_mxfp4_dequantization_by_hand():
    # byte = hi << 4 | lo; the low nibble is the first value. e2m1: 0x1 = 0.5, 0x2 = 1.0, 0x7 = 6.0, 0x9 = -0.5, 0xF = -6.0
    blocks = torch.zeros(2, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x21  # 0.5, 1.0
    blocks[0, 0, 1] = 0xF7  # 6.0, -6.0
    blocks[1, 0, 15] = 0x9A  # -1.0, -0.5 (last pair of the block)
    scales = torch.tensor([[128], [125]], dtype=torch.uint8)  # 2 ** 1, 2 ** -2
    out = dequantize_mxfp4(blocks, scales)
    assert out.shape == (2, 32)
    want = torch.zeros(2, 32)
    want[0, :4] = torch.tensor([1.0, 2.0, 12.0, -12.0])
    want[1, 30:] = torch.tensor([-0.25, -0.125])
    assert torch.equal(out, want)
    with pytest.raises(MoekitError, match="do not fit scales"):
        dequantize_mxfp4(blocks, scales[:1])


def test_mxfp4_gpt_oss_checkpoint_loads_dequantized(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    ref = build_hf("gpt_oss", intermediate_size=32, hidden_size=64, head_dim=16)  # MXFP4 blocks of 32 need D, F % 32 == 0
    ref.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / hf.SINGLE_FILE))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            p = f"model.layers.{i}.mlp.experts."
            for proj, rows, cols in (("gate_up_proj", 64, 64), ("down_proj", 64, 32)):
                blocks = torch.randint(0, 256, (5, rows, cols // 32, 16), dtype=torch.uint8, generator=gen)
                scales = torch.randint(120, 126, (5, rows, cols // 32), dtype=torch.uint8, generator=gen)
                del state[p + proj]
                state[p + proj + "_blocks"], state[p + proj + "_scales"] = blocks, scales
                # transformers' own converter gives the oracle's dense weights
                getattr(layer.mlp.experts, proj).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    save_file(state, str(tmp_path / hf.SINGLE_FILE), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert logit_gap(ref, hf.load(tmp_path)) <= 1e-4
    cfg["quantization_config"] = {"quant_method": "fp8"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.UnsupportedModelError, match="quant_method='fp8'"):
        hf.load(tmp_path)


# ---------------------------------------------------------------- offloading, refusals, the CLI's arch list


def test_offloading(tmp_path):
    phimoe = tmp_path / "phimoe"
    build_hf("phimoe").save_pretrained(phimoe, max_shard_size="60KB")
    want = [c.token_ids for c in Engine.load(phimoe).generate(PROMPTS[:1], max_new_tokens=8, temperature=0)]
    engine = Engine.load(phimoe)  # per-expert w1/w3/w2 tensors: the disk tier reads them by name
    offloader = engine.offload("50%", tier="disk", predictor="next-gate")
    assert [c.token_ids for c in engine.generate(PROMPTS[:1], max_new_tokens=8, temperature=0)] == want
    offloader.close()
    granite = tmp_path / "granite"
    build_hf("granitemoe").save_pretrained(granite)
    want = [c.token_ids for c in Engine.load(granite).generate(PROMPTS[:1], max_new_tokens=8, temperature=0)]
    engine = Engine.load(granite)
    offloader = engine.offload("80%", tier="memory")  # granite routes to 3 of 5
    assert [c.token_ids for c in engine.generate(PROMPTS[:1], max_new_tokens=8, temperature=0)] == want
    offloader.close()
    with pytest.raises(MoekitError, match="no expert weights"):  # fused input_linear: the disk tier cannot read it yet
        Engine.load(granite).offload("80%", tier="disk")
    gpt = tmp_path / "gpt"
    build_hf("gpt_oss").save_pretrained(gpt)
    with pytest.raises(MoekitError, match="GPT-OSS models cannot be offloaded"):
        Engine.load(gpt).offload("50%", tier="memory")


def test_features_are_refused_by_name(tmp_path):
    path = tmp_path / "m"
    build_hf("phimoe").save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    for change, message in (({"num_experts_per_tok": 3}, "num_experts_per_tok=3"), ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
                            ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type='yarn'")):
        (path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(hf.UnsupportedModelError, match=message):
            hf.load(path)
    (path / "config.json").write_text(json.dumps(cfg))
    model = hf.load(path)
    with pytest.raises(hf.UnsupportedModelError, match="norm='layer'.*only phimoe"):
        hf.save(model, tmp_path / "a", arch="mixtral")
    with pytest.raises(hf.UnsupportedModelError, match="router='sparsemixer'.*gpt_oss uses 'topk'"):
        hf.save(model, tmp_path / "b", arch="gpt_oss")
    plain = DecoderLM(ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, moe=MoEConfig(num_experts=4, expert_hidden=16)))
    with pytest.raises(hf.UnsupportedModelError, match="attention_sinks=false"):
        hf.save(plain, tmp_path / "c", arch="gpt_oss")
    assert not any(p.name in "abc" for p in tmp_path.iterdir())  # nothing half-written
    assert HF_ARCHS == hf.SUPPORTED_MODEL_TYPES


NATIVE = {
    "granitemoe": dict(qkv_bias=True, o_bias=True, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                       logits_scaling=2.0, moe=dict(score_func="topk_softmax", norm_topk_prob=False)),
    "phimoe": dict(norm="layer", lm_head_bias=True, qkv_bias=True, o_bias=True, moe=dict(router="sparsemixer", sparsemixer_eps=0.2)),
    "gpt_oss": dict(head_dim=12, qkv_bias=True, o_bias=True, attention_sinks=True, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, truncate=False),
                    moe=dict(activation="clamped_swiglu", expert_biases=True, router_bias=True, score_func="topk_softmax",
                             norm_topk_prob=False, swiglu_limit=0.9)),
}


@pytest.mark.parametrize("family", list(NATIVE))
def test_moekit_model_exports_to_transformers_with_the_same_logits(family, tmp_path):
    kw = dict(NATIVE[family])
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=16, **kw.pop("moe"))
    torch.manual_seed(1)
    model = DecoderLM(ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                                  max_seq_len=64, moe=moe, **kw)).eval()
    with torch.no_grad():  # every bias, sink and norm away from its init
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith(("b_in_EH", "b_out_ED")):
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.3)
    out = hf.save(model, tmp_path / family, arch="auto")
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    assert logit_gap(ref, model, [p + [40, 41, 42] for p in PROMPTS]) <= 1e-4


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_gpt_oss_generates_and_equals_its_hand_quantized_twin(tmp_path, quantize):
    """Issue 22's crash: quantized GPT-OSS experts dropped their biases and called the activation's name.

    Oracle: the fp32 model with its expert weights quantized and dequantized by quant_format's reference
    (biases and the clamped SwiGLU untouched); the kernels add only their activation rounding (native).
    """
    from moekit.moe.quant_format import QuantSpec, dequantize, quantize as quantize_weight

    ref = build_hf("gpt_oss", intermediate_size=32, hidden_size=64, head_dim=16)  # int4 groups of 32: D, F % 32 == 0
    ref.save_pretrained(tmp_path)
    quant = Engine.load(tmp_path, quantize=quantize)
    out = quant.generate([[5, 6, 7, 8]], max_new_tokens=6, temperature=0)[0]
    assert len(out.token_ids) == 6
    fp32, twin = Engine.load(tmp_path).model, Engine.load(tmp_path).model
    spec = QuantSpec(8) if quantize == "int8" else QuantSpec(4, 32)
    with torch.no_grad():
        for layer in twin.layers:
            for p in (layer.mlp.experts.w_in_EHD, layer.mlp.experts.w_out_EDF):
                p.copy_(dequantize(quantize_weight(p, spec), spec))
    ids, mask = padded(PROMPTS)
    got, want, base = (moekit_logits(m, ids, mask)[mask.bool()] for m in (quant.model, twin, fp32))
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()  # the native kernels round activations to int8 blocks
    assert (want - base).abs().max() > 1e-3 * base.abs().max()  # and the weights really are quantized
