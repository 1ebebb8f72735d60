"""moekit.hf: Hugging Face MoE checkpoints in and out, checked against transformers itself.

For each family a tiny random model is built with transformers and saved with
`save_pretrained`; moekit loads it and must give the same logits (batch with
padding), the same greedy tokens as `generate`, cached decode equal to a full
forward, and an export that transformers reloads to the same logits.
"""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from moekit import hf  # noqa: E402
from moekit.config import MoEConfig  # noqa: E402
from moekit.models.decoder import DecoderLM, ModelConfig  # noqa: E402
from moekit.errors import CheckpointError, ConfigError, MoekitError  # noqa: E402
from moekit.infer import Engine  # noqa: E402
from moekit.infer.chat import load_chat_template, render_chat, special_tokens, stop_token_ids  # noqa: E402

from hf_helpers import (PROMPTS, cached_decode_against_full_forward, export_round_trip, family_fixture,  # noqa: E402
                        greedy_against_generate, logit_gap, moekit_logits, padded, tiny_hf)

FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      mlp_only_layers=[1], norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=True, head_dim=16,
                      decoder_sparse_step=1, mlp_only_layers=[0]),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
}
VOCAB = 96


pytestmark = pytest.mark.usefixtures("one_thread")


def build_hf(family, seed=0, **overrides):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, eos_token_id=None,
                bos_token_id=None, pad_token_id=0)
    return tiny_hf(family, base, FAMILIES[family], overrides, seed)


def saved(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path


family_dir = family_fixture(build_hf, FAMILIES)


# ---------------------------------------------------------------- loading == transformers


def test_logits_match_transformers_on_a_padded_batch(family_dir):
    family, ref, path = family_dir
    model = hf.load(path)
    assert model.cfg.qk_norm == hf.FAMILIES[family].qk_norm
    assert logit_gap(ref, model) <= 1e-4


def test_greedy_generation_equals_transformers_generate(family_dir):
    family, ref, path = family_dir
    for completion in greedy_against_generate(ref, path):
        assert completion.finish_reason == "length"


def test_cached_decode_equals_full_forward(family_dir):
    family, ref, path = family_dir
    cached_decode_against_full_forward(path)


def test_export_then_reload_round_trips(family_dir, tmp_path):
    family, ref, path = family_dir
    model = hf.load(path)
    out = hf.save(model, tmp_path / "exported", arch=family)
    export_round_trip(ref, out)


# ---------------------------------------------------------------- files, dtypes, layouts


def test_sharded_checkpoint_with_index(tmp_path):
    ref = build_hf("mixtral")
    path = saved(ref, tmp_path / "sharded", max_shard_size="40KB")
    assert (path / hf.INDEX_FILE).is_file() and len(list(path.glob("model-*.safetensors"))) > 1
    assert logit_gap(ref, hf.load(path)) <= 1e-4


def test_bf16_and_fp16_loading(tmp_path):
    ref = build_hf("qwen3_moe")
    path = saved(ref, tmp_path / "m")
    ids, mask = padded(PROMPTS)
    with torch.no_grad():
        expected = ref.to(torch.bfloat16)(input_ids=ids, attention_mask=mask).logits.float()
    for dtype in ("bfloat16", torch.float16):
        model = hf.load(path, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {hf.resolve_dtype(dtype)}
        assert model.rotary.inv_freq.dtype == torch.float32
        got = moekit_logits(model, ids, mask).float()
        assert torch.isfinite(got).all()
        assert (got - expected)[mask.bool()].abs().max() < 0.1
    out = Engine.load(path, dtype="bfloat16").generate(PROMPTS, max_new_tokens=4, temperature=0)
    assert all(len(c.token_ids) == 4 for c in out)


def test_fused_expert_tensors_load(tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F]) also loads."""
    from safetensors.torch import load_file, save_file

    ref = build_hf("qwen3_moe")
    path = saved(ref, tmp_path / "m")
    state = load_file(str(path / hf.SINGLE_FILE))
    fused = {}
    for i in range(3):
        p = f"model.layers.{i}.mlp.experts."
        if f"{p}0.gate_proj.weight" not in state:
            continue
        gates = [state.pop(f"{p}{e}.gate_proj.weight") for e in range(8)]
        ups = [state.pop(f"{p}{e}.up_proj.weight") for e in range(8)]
        downs = [state.pop(f"{p}{e}.down_proj.weight") for e in range(8)]
        fused[p + "gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gates, ups)])
        fused[p + "down_proj"] = torch.stack(downs)
    save_file({**state, **fused}, str(path / hf.SINGLE_FILE))
    assert logit_gap(ref, hf.load(path)) <= 1e-4


def test_tied_embeddings_and_sliding_window(tmp_path):
    ref = build_hf("mixtral", tie_word_embeddings=True, sliding_window=64)
    path = saved(ref, tmp_path / "m")
    model = hf.load(path)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.cfg.max_seq_len == 64  # beyond its window moekit would differ, so the context stops there
    assert logit_gap(ref, model) <= 1e-4
    out = hf.save(model, tmp_path / "out", arch="mixtral")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in json.dumps(list(hf.weight_files(out)))


# ---------------------------------------------------------------- export of moekit models


def native(**kw):
    moe = kw.pop("moe", {})
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=64,
                dense_hidden=40, norm_eps=1e-6, rope_theta=10000.0)
    base.update(kw)
    torch.manual_seed(1)
    model = DecoderLM(ModelConfig(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, **moe), **base)).eval()
    with torch.no_grad():  # norms away from 1 so a mapping mistake would show
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.uniform_(0.5, 1.5)
    return model


NATIVE = {
    "mixtral": dict(),
    "qwen2_moe": dict(qkv_bias=True, first_k_dense=1, moe=dict(num_shared_experts=1, shared_expert_hidden=24,
                                                               shared_expert_gate=True, norm_topk_prob=False)),
    "qwen3_moe": dict(qk_norm="head", head_dim=16, moe_layer_freq=2),
    "olmoe": dict(qk_norm="full", tie_embeddings=True, moe=dict(norm_topk_prob=False)),
}


@pytest.mark.parametrize("family", list(NATIVE))
def test_moekit_model_exports_to_transformers_with_the_same_logits(family, tmp_path):
    model = native(**NATIVE[family])
    out = hf.save(model, tmp_path / family, arch="auto")
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    ref = AutoModelForCausalLM.from_pretrained(out).eval()
    assert logit_gap(ref, model) <= 1e-4


def test_export_refuses_models_that_fit_no_family(tmp_path):
    with pytest.raises(hf.UnsupportedModelError, match="ffn='residual_moe'"):
        hf.save(native(ffn="residual_moe"), tmp_path / "a")
    with pytest.raises(hf.UnsupportedModelError, match="qk_norm='none'.*'head'"):
        hf.save(native(), tmp_path / "b", arch="qwen3_moe")
    with pytest.raises(hf.UnsupportedModelError, match="score_func='sigmoid'"):
        hf.save(native(moe=dict(score_func="sigmoid")), tmp_path / "c", arch="mixtral")
    with pytest.raises(ConfigError, match="arch='llama' is unknown"):
        hf.save(native(), tmp_path / "d", arch="llama")
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_export_writes_shards_and_refuses_a_nonempty_directory(tmp_path):
    model = native()
    out = hf.save(model, tmp_path / "m", max_shard_bytes=20_000)
    assert (out / hf.INDEX_FILE).is_file()
    ids, mask = padded(PROMPTS)
    torch.testing.assert_close(moekit_logits(hf.load(out), ids, mask), moekit_logits(model, ids, mask))
    with pytest.raises(ConfigError, match="not empty"):
        hf.save(model, out)


# ---------------------------------------------------------------- bad input: one clear message each


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(hf.UnsupportedModelError, match="model_type='llama'.*mixtral, qwen2_moe, qwen3_moe, olmoe"):
        hf.load(tmp_path)


def test_missing_shard_is_named(tmp_path):
    path = saved(build_hf("olmoe"), tmp_path / "m", max_shard_size="40KB")
    victim = sorted(path.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard.*{victim.name}.*missing"):
        hf.load(path)


def test_config_that_disagrees_with_the_weights_names_tensor_and_shapes(tmp_path):
    path = saved(build_hf("mixtral"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"experts\.0\.w1\.weight has shape \[40, 32\] but the config needs \[48, 32\]"):
        hf.load(path)
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 40, 2
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not fit the config.*model.layers.2"):
        hf.load(path)
    cfg["num_hidden_layers"] = 4
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing from the weights.*model.layers.3"):
        hf.load(path)


def test_other_bad_directories(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        hf.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        hf.load(tmp_path)
    path = saved(build_hf("mixtral"), tmp_path / "m")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refuses pickles"):
        hf.load(path)
    (path / "pytorch_model.bin").unlink()
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        hf.load(path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(hf.UnsupportedModelError, match="rope_type='yarn'"):
        hf.load(path)
    (path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(hf.UnsupportedModelError, match="hidden_act='gelu'"):
        hf.load(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        hf.load(path)
    with pytest.raises(ConfigError, match="dtype='int8' is unknown"):
        hf.resolve_dtype("int8")
    assert all(issubclass(e, MoekitError) for e in (CheckpointError, ConfigError, hf.UnsupportedModelError))


def test_shared_dir_tokenizer_chat_template_and_stop_ids(tmp_path):
    from moekit.data.text import Tokenizer

    path = saved(build_hf("qwen2_moe", vocab_size=260, eos_token_id=256), tmp_path / "m")
    Tokenizer.byte_level().save(path)
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}" \
               "{% if add_generation_prompt %}<assistant>{% endif %}"
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|endoftext|>"}))
    assert stop_token_ids(path) == [256]
    assert load_chat_template(path) == template
    text = render_chat(template, [{"role": "user", "content": "hi"}], **special_tokens(path))
    assert text == "<user>hi<|endoftext|><assistant>"
    engine = Engine.load(path)
    assert engine.encode("hi", chat=True) == engine.tokenizer.encode(text)
    shutil.rmtree(path)
