"""Lazy loading: with an expert budget the experts are never read into memory, and the tokens are the resident ones."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from moekit.checkpoints import save_checkpoint
from moekit.config import MoEConfig, to_dict
from moekit.data.text import Tokenizer
from moekit.infer import Engine
from moekit.infer.offload import OffloadedExperts
from moekit.infer.sampling import SamplingConfig
from moekit.models.decoder import DecoderLM, ModelConfig


def _save(tmp_path, **moe):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=64,
                      dense_hidden=48, first_k_dense=1,
                      moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=24, num_shared_experts=1, **moe))
    model = DecoderLM(cfg)
    save_checkpoint(tmp_path / "run", 1, config={"model": to_dict(cfg)}, model_state=model.state_dict(), optimizer_state=None,
                    trainer_state={}, tokenizer=Tokenizer.byte_level())
    return tmp_path / "run"


def _greedy(engine):
    cfg = SamplingConfig(max_new_tokens=10, temperature=0, stop_token_ids=[])
    return [c.token_ids for c in engine.generate_ids([[1, 2, 3], [40, 41, 42, 43, 44]], cfg)]


def test_lazily_loaded_offloaded_generation_gives_the_resident_tokens(tmp_path):
    run = _save(tmp_path)
    want = _greedy(Engine.load(run))
    for budget in ("25%", 0.5, "100%"):
        engine = Engine.load(run, expert_budget=budget, predictor="next-gate")
        moe_layers = [layer.mlp for layer in engine.model.layers if layer.is_moe]
        assert all(type(m.experts) is OffloadedExperts for m in moe_layers)
        assert _greedy(engine) == want, budget
        assert engine.offloader.stats()["misses"] > 0
        engine.offloader.close()


def test_lazy_loading_of_a_hugging_face_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    want = _greedy(Engine.load(tmp_path / "hf"))
    engine = Engine.load(tmp_path / "hf", expert_budget="50%")
    assert all(type(layer.mlp.experts) is OffloadedExperts for layer in engine.model.layers)
    assert _greedy(engine) == want
    engine.offloader.close()


def test_offload_options_need_a_budget_and_a_disk_tier(tmp_path):
    run = _save(tmp_path)
    from moekit.errors import ConfigError, MoekitError

    with pytest.raises(ConfigError, match="only apply with an expert budget"):
        Engine.load(run, policy="lfu")
    with pytest.raises(MoekitError, match="can only come from its checkpoint: use tier 'disk'"):
        Engine.load(run, expert_budget="25%", tier="memory")


# VmHWM (this process's own peak RSS), not ru_maxrss: after fork + exec the latter still counts the parent's pages.
PEAK = textwrap.dedent("""
    import json, sys
    import torch
    import moekit.hf, moekit.infer.chat, moekit.infer.offload, moekit.models.build  # the runtime, before the baseline
    from moekit.infer import Engine
    from moekit.infer.sampling import SamplingConfig

    def peak():
        line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    torch.ones(1)
    with torch.device("meta"):  # torch's meta-device reference kernels (dynamo, sympy: ~100 MB), which offloading's
        torch.nn.Linear(2, 2)   # meta-built slots import on first use: the runtime, not weights
    torch.empty_like(torch.empty(1, device="meta"), device="cpu")
    before = peak()
    budget = None if sys.argv[2] == "none" else sys.argv[2]
    engine = Engine.load(sys.argv[1], expert_budget=budget)
    engine.generate_ids([[1, 2, 3]], SamplingConfig(max_new_tokens=3, temperature=0, stop_token_ids=[]))
    print(json.dumps({"growth": peak() - before}))
""")


def test_peak_memory_with_a_budget_excludes_the_experts(tmp_path):
    """A model whose experts are 200 MB: resident loading grows RSS past them; a 25% budget stays near 25% of them."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=4, max_seq_len=64,
                      moe=MoEConfig(num_experts=16, top_k=2, expert_hidden=1024))
    with torch.no_grad():
        model = DecoderLM(cfg)
    expert_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    assert expert_bytes > 190e6
    save_checkpoint(tmp_path / "big", 1, config={"model": to_dict(cfg)}, model_state=model.state_dict(), optimizer_state=None,
                    trainer_state={}, tokenizer=Tokenizer.byte_level())
    del model
    growth = {}
    for budget in ("none", "25%"):
        out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "big"), budget], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        growth[budget] = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    assert growth["none"] > expert_bytes  # the measurement sees experts when they are loaded
    assert growth["none"] < 1.1 * expert_bytes + 120e6, growth  # resident: each weight in memory once (plus the runtime)
    # with a 25% budget: a quarter of the experts in fast slots, the rest never read (plus the same runtime allowance)
    assert growth["25%"] < 0.25 * expert_bytes + 120e6, (growth, expert_bytes)
    assert growth["25%"] < growth["none"] - 0.6 * expert_bytes, growth


# ---------------------------------------------------------------- resident loading holds each weight once

def _quantized_oracle(model, bits):
    from moekit.quantize import quantize_model

    return quantize_model(model, **({"bits": 8} if bits == 8 else {"bits": 4, "group_size": 32}))


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_resident_quantize_at_load_equals_quantizing_the_loaded_model(tmp_path, quantize):
    """Experts quantized one at a time as read give the very tensors of quantizing the whole fp32 model."""
    from moekit import hf

    cfg = ModelConfig(vocab_size=257, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=64,
                      dense_hidden=48, first_k_dense=1, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32))
    torch.manual_seed(1)
    model = DecoderLM(cfg)
    save_checkpoint(tmp_path / "run", 1, config={"model": to_dict(cfg)}, model_state=model.state_dict(), optimizer_state=None,
                    trainer_state={}, tokenizer=Tokenizer.byte_level())
    cfg.first_k_dense = 0  # (Mixtral has no dense layers)
    out = hf.save(DecoderLM(cfg), tmp_path / "hf", arch="mixtral")
    bits = 8 if quantize == "int8" else 4
    for path in (tmp_path / "run", out):
        for dtype in (None, "bfloat16"):
            want = _quantized_oracle(Engine.load(path, dtype=dtype).model, bits).state_dict()
            got = Engine.load(path, dtype=dtype, quantize=quantize).model.state_dict()
            assert want.keys() == got.keys() and any(k.endswith("w_in_EHD_q") for k in got)
            assert all(torch.equal(want[k], got[k]) for k in want), (path.name, dtype)


def test_quantize_at_load_of_experts_stored_transposed_reads_the_whole_model(tmp_path):
    """gpt-oss stores its experts transposed and interleaved: not read one at a time, yet quantized the same."""
    transformers = pytest.importorskip("transformers")
    from moekit import hf
    from moekit.hf.reader import experts_as_stored

    cfg = transformers.GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                    num_experts_per_tok=2, max_position_embeddings=64, layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    transformers.GptOssForCausalLM(cfg).save_pretrained(tmp_path / "gpt")
    assert not experts_as_stored(tmp_path / "gpt")
    want = _quantized_oracle(hf.load(tmp_path / "gpt"), 8).state_dict()
    got = Engine.load(tmp_path / "gpt", quantize="int8").model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


RESIDENT = textwrap.dedent("""
    import json, sys
    import torch
    import moekit.hf, moekit.infer.chat, moekit.infer.offload, moekit.models.build, moekit.quantize  # the runtime
    from moekit.infer import Engine

    def peak():
        line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024

    torch.ones(1)
    with torch.device("meta"):  # (the runtime's meta-device kernels, as in PEAK above: quantizing meta-built experts uses them)
        torch.nn.Linear(2, 2)
    torch.empty_like(torch.empty(1, device="meta"), device="cpu")
    before = peak()
    engine = Engine.load(sys.argv[1], quantize=None if sys.argv[2] == "none" else sys.argv[2])
    print(json.dumps({"growth": peak() - before}))
""")


def _peak_growth(path, quantize):
    out = subprocess.run([sys.executable, "-c", RESIDENT, str(path), quantize], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["growth"]


@pytest.mark.slow
def test_resident_loading_peaks_at_one_copy_of_the_model(tmp_path):
    """A ~200 MB model (4 MoE layers of 16 experts): resident loading grows RSS by about the model's bytes, not twice,
    from a moekit checkpoint and a Hugging Face directory; int4 at load holds one layer's fp32 experts at most."""
    from moekit import hf

    cfg = ModelConfig(vocab_size=257, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, max_seq_len=64,
                      moe=MoEConfig(num_experts=16, top_k=2, expert_hidden=512))
    torch.manual_seed(0)
    with torch.no_grad():
        model = DecoderLM(cfg)
    sizes = {n: p.numel() * 4 for n, p in model.named_parameters()}
    model_bytes = sum(sizes.values())
    expert_bytes = sum(v for n, v in sizes.items() if ".experts." in n)
    assert model_bytes > 200e6 and expert_bytes > 0.9 * model_bytes
    save_checkpoint(tmp_path / "run", 1, config={"model": to_dict(cfg)}, model_state=model.state_dict(), optimizer_state=None,
                    trainer_state={}, tokenizer=Tokenizer.byte_level())
    hf.save(model, tmp_path / "hf", arch="mixtral")
    del model
    # int4, group 32: half a byte per weight plus one fp32 scale per 32 weights
    int4_bytes = expert_bytes / 4 * (0.5 + 4 / 32)
    layer_fp32 = expert_bytes / cfg.num_layers
    for path in (tmp_path / "run", tmp_path / "hf"):
        growth = _peak_growth(path, "none")
        assert 0.9 * model_bytes < growth <= 1.2 * model_bytes, (path.name, growth, model_bytes)
        growth = _peak_growth(path, "int4")
        assert growth <= (model_bytes - expert_bytes) + layer_fp32 + int4_bytes + 30e6, (path.name, growth, int4_bytes)
        assert growth > int4_bytes  # the measurement sees the quantized experts
