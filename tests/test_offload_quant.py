"""Quantized experts behind the offloading, the low-bit fallback (HOBBIT), and GGUF files with a budget or requantized.

Oracles: the resident quantized model's greedy tokens (offloaded quantized generation must give exactly
them, at 25% and 50% budgets, memory and disk tiers, quantized at load or from a `moekit quantize`
checkpoint); bytes per miss from the tensor shapes by hand (Python arithmetic on H, D, F and the group
size) and from what the tier's reads returned; the int4 fallback against dequantize-then-matmul written
here with quant_format's reference quantizer; lazily offloaded GGUF generation against resident GGUF
generation; GGUF requantized int8 against the same weights quantized by hand, and near the fp32 model.
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from moekit.checkpoints import save_checkpoint
from moekit.cli.main import main
from moekit.config import MoEConfig, to_dict
from moekit.data.text import Tokenizer
from moekit.errors import MoekitError
from moekit.infer.engine import Engine
from moekit.infer.offload import OffloadedExperts, format_stats, offload_model
from moekit.infer.quantized_checkpoint import quantize_checkpoint
from moekit.infer.sampling import SamplingConfig
from moekit.infer.serve_stats import ServeStats
from moekit.models.decoder import DecoderLM, ModelConfig
from moekit.moe.quant_format import QuantSpec, dequantize, quantize
from moekit.moe.quantized import QuantizedExperts
from quant_oracle import fake_quant_rows

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 17, 3, 99, 42, 8, 23], [61, 2]]
H, D, FF, E = 64, 32, 32, 8  # SwiGLU: w_in [E, 2F, D], w_out [E, D, F]


def tiny_model(seed: int = 0) -> DecoderLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=257, hidden_size=D, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=128,
                      dense_hidden=64, moe=MoEConfig(num_experts=E, top_k=2, expert_hidden=FF))
    model = DecoderLM(cfg).eval()
    with torch.no_grad():  # sharper, input-dependent routing than the 0.02-std init gives
        for layer in model.layers:
            layer.mlp.router.gate.weight.normal_(0, 1.0)
            layer.mlp.experts.w_in_EHD.normal_(0, 0.2)
            layer.mlp.experts.w_out_EDF.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("offq") / "run"
    model = tiny_model()
    save_checkpoint(d, 0, config={"model": to_dict(model.cfg)}, model_state=model.state_dict(), optimizer_state=None,
                    trainer_state={}, tokenizer=Tokenizer.byte_level())
    return d


def greedy(engine: Engine, n: int = 10, prompts=PROMPTS) -> list[list[int]]:
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop_token_ids=[])
    return [c.token_ids for c in engine.generate_ids([list(p) for p in prompts], cfg)]


@pytest.fixture(scope="module")
def resident(run):
    return {q: greedy(Engine.load(run, quantize=q)) for q in ("int8", "int4")}


def _quantized_slots(engine) -> bool:
    experts = [layer.mlp.experts for layer in engine.model.layers]
    return all(type(x) is OffloadedExperts and type(x.slots) is QuantizedExperts for x in experts)


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("budget", ["25%", "50%"])
def test_offloaded_quantized_generation_gives_the_resident_quantized_tokens(run, resident, tmp_path, quant, budget):
    want = resident[quant]
    # quantized at load, lazily: each expert quantized as it is read into a spill file (the disk tier)
    lazy = Engine.load(run, quantize=quant, expert_budget=budget, spill_dir=tmp_path)
    assert _quantized_slots(lazy) and "spill file" in lazy.offloader.tier.label
    full = [k for k, v in lazy.model.state_dict().items() if v.is_floating_point() and not v.is_meta and v.shape[-2:] == (H, D)]
    assert full == []  # no full-precision copy of any layer's experts was kept
    assert not lazy.offloader.tier.files[0].exists()  # unlinked once open: nothing is left behind, even after a crash
    assert greedy(lazy) == want and lazy.offloader.stats()["misses"] > 0
    lazy.offloader.close()
    # resident quantized model offloaded to host memory
    engine = Engine.load(run, quantize=quant)
    engine.offload(budget, tier="memory")
    assert _quantized_slots(engine) and greedy(engine) == want
    engine.offloader.close()
    # a checkpoint written by `moekit quantize`, loaded lazily: the disk tier reads its codes and scales
    out = tmp_path / "q"
    quantize_checkpoint(run, out, bits=8 if quant == "int8" else 4, group_size=None if quant == "int8" else 32)
    from_ckpt = Engine.load(out, expert_budget=budget)
    assert _quantized_slots(from_ckpt) and str(out) in from_ckpt.offloader.tier.label
    assert greedy(from_ckpt) == want and from_ckpt.offloader.stats()["misses"] > 0
    from_ckpt.offloader.close()


def test_a_hugging_face_directory_quantized_at_load_and_offloaded(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "hf")  # per-expert w1/w3/w2 tensors
    prompts = [[5, 17, 3, 9, 42, 8, 23], [61, 2]]  # (a vocabulary of 96)
    want = greedy(Engine.load(tmp_path / "hf", quantize="int4"), prompts=prompts)
    engine = Engine.load(tmp_path / "hf", quantize="int4", expert_budget="50%", spill_dir=tmp_path)
    assert _quantized_slots(engine) and greedy(engine, prompts=prompts) == want
    engine.offloader.close()


def test_bytes_moved_per_miss_are_the_packed_bytes(run):
    per_expert = {  # by hand from the shapes: codes + fp32 scales
        "fp32": (H * D + D * FF) * 4,
        "int8": H * D + H * 4 + D * FF + D * 4,
        "int4": H * D // 2 + H * (D // 32) * 4 + D * FF // 2 + D * (FF // 32) * 4,
    }
    moved = {}
    for quant in per_expert:
        engine = Engine.load(run, quantize=None if quant == "fp32" else quant)
        offloader = engine.offload("25%", tier="memory")
        returned = []
        read = offloader.tier.read
        offloader.tier.read = lambda *a: returned.append(read(*a)) or returned[-1]  # what each read really copied
        greedy(engine)
        offloader.drain()
        stats = engine.last_stats["offload"]
        assert stats["transfers"] > 0 and stats["bytes_moved"] == sum(returned)
        assert set(returned) == {per_expert[quant]} and stats["bytes_per_expert"] == [per_expert[quant]] * 3
        moved[quant] = stats["bytes_moved"] / stats["transfers"]
        offloader.close()
    ratio = moved["fp32"] / moved["int4"]
    assert 6.0 < ratio < 6.6, ratio  # 8 codes per 4 bytes, less one fp32 scale per 32 weights: 6.4
    assert 3.5 < moved["fp32"] / moved["int8"] < 4.0


def test_a_byte_budget_counts_the_quantized_bytes(run):
    # 100 KB of 3 x 8 experts: fp32 (12288 B each) floor(100e3 / 294912 * 8) = 2 slots per layer; int4 (1920 B) all 8
    fp32 = Engine.load(run).offload("100KB", tier="memory")
    int4 = Engine.load(run, quantize="int4").offload("100KB", tier="memory")
    assert fp32.num_slots == [2, 2, 2] and int4.num_slots == [8, 8, 8]
    assert int4.stats()["total_expert_bytes"] == 3 * 8 * 1920
    fp32.close()
    int4.close()


# ---------------------------------------------------------------- the low-bit fallback


def _oracle_int4(x_ND, w_in_HD, w_out_DF, act_round=lambda x: x):
    """Dequantize-then-matmul with quant_format's reference quantizer (int4, group 32, symmetric).

    act_round: what the kernel does to each matmul's input (the native kernels round it to int8 blocks).
    """
    spec = QuantSpec(bits=4, group_size=32)
    w_in, w_out = (dequantize(quantize(w, spec), spec) for w in (w_in_HD, w_out_DF))
    gate, up = F.linear(act_round(x_ND), w_in).chunk(2, dim=-1)
    return F.linear(act_round(F.silu(gate) * up), w_out)


def _fp32(x_ND, w_in_HD, w_out_DF):
    gate, up = F.linear(x_ND, w_in_HD).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w_out_DF)


@pytest.mark.parametrize("kernels", ["fp32 activations", "native"])
def test_low_bit_fallback_computes_a_miss_from_the_int4_copy(kernels):
    from moekit.moe import native

    if kernels == "native" and native.isa() in ("none", "generic"):
        pytest.skip("the native kernels' vector build does not run here")
    ctx = native.off() if kernels != "native" else contextlib.nullcontext()
    act_round = fake_quant_rows if kernels == "native" else (lambda x: x)
    with ctx:
        _fallback_case(act_round)


def _fallback_case(act_round):
    model = tiny_model()
    w_in, w_out = (t.detach().clone() for t in (model.layers[0].mlp.experts.w_in_EHD, model.layers[0].mlp.experts.w_out_EDF))
    offloader = offload_model(model, "25%", tier="memory", low_bit_fallback=True)
    experts = model.layers[0].mlp.experts
    torch.manual_seed(1)
    x_ND = torch.randn(5, D)
    rows_E = torch.tensor([0, 2, 0, 0, 0, 3, 0, 0])
    with torch.no_grad():
        first = experts(x_ND, rows_E)  # both experts miss: computed from the int4 copy, full copies start loading
        want = torch.cat([_oracle_int4(x_ND[:2], w_in[1], w_out[1], act_round), _oracle_int4(x_ND[2:], w_in[5], w_out[5], act_round)])
        torch.testing.assert_close(first, want, atol=1e-5, rtol=1e-5)
        full = torch.cat([_fp32(x_ND[:2], w_in[1], w_out[1]), _fp32(x_ND[2:], w_in[5], w_out[5])])
        assert (first - full).abs().max() > 1e-3  # the int4 copy really is another weight
        stats = offloader.stats()
        assert stats["fallbacks"] == 2 and stats["misses"] == 2 and stats["transfers"] == 2 and stats["low_bit_fallback"]
        offloader.drain()
        second = experts(x_ND, rows_E)  # now both are in their slots: full precision
        torch.testing.assert_close(second, full, atol=1e-6, rtol=1e-6)
    stats = offloader.stats()
    assert stats["fallbacks"] == 2 and stats["hits"] == 2
    assert stats["fallback_bytes"] == 3 * E * (H * D // 2 + H * (D // 32) * 4 + D * FF // 2 + D * (FF // 32) * 4)
    offloader.close()


def test_low_bit_fallback_in_generation_stats_report_and_server(run):
    engine = Engine.load(run, expert_budget="25%", low_bit_fallback=True)
    tokens = greedy(engine)
    stats = engine.last_stats["offload"]
    assert stats["fallbacks"] == stats["misses"] > 0 and len(tokens[0]) == 10
    assert f"low-bit fallback: {stats['fallbacks']} misses" in format_stats(stats, engine.last_stats)
    assert ServeStats().moe_report(engine.offloader)["offload"]["fallbacks"] == stats["fallbacks"]
    engine.offloader.close()


# ---------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    pytest.importorskip("gguf")
    import moekit.gguf as G

    path = tmp_path_factory.mktemp("offq_gguf") / "m.gguf"
    model = tiny_model(seed=3)
    model.cfg.moe.norm_topk_prob = True  # (Mixtral's, as llama.cpp's llama arch fixes it)
    G.save(model, path, Tokenizer.byte_level(), dtype="Q8_0")
    return path


@pytest.mark.parametrize("budget", ["25%", "50%"])
def test_lazy_gguf_offloaded_generation_gives_the_resident_tokens(gguf_file, budget):
    want = greedy(Engine.load(gguf_file))
    engine = Engine.load(gguf_file, expert_budget=budget)
    assert engine.offloader.tier.kind == "gguf"
    assert greedy(engine) == want and engine.offloader.stats()["misses"] > 0
    engine.offloader.close()
    q_want = greedy(Engine.load(gguf_file, quantize="int4"))
    q = Engine.load(gguf_file, expert_budget=budget, quantize="int4")
    assert _quantized_slots(q) and greedy(q) == q_want
    q.offloader.close()


def test_gguf_tier_counts_the_file_bytes_it_reads(gguf_file):
    """bytes_moved is the experts' Q8_0 blocks in the file (hand count from type and shape), not the fp32 slots."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    per_expert = {}
    for t in GGUFReader(str(gguf_file)).tensors:
        if t.name.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")):
            assert t.tensor_type == GGMLQuantizationType.Q8_0
            block, type_size = GGML_QUANT_SIZES[t.tensor_type]  # (32 weights, 34 bytes: 32 int8 + an f16 scale)
            cols, rows = int(t.shape[0]), int(t.shape[1])  # one expert: rows x cols, cols split into blocks
            layer = int(t.name.split(".")[1])
            per_expert[layer] = per_expert.get(layer, 0) + rows * (cols // block) * type_size
    assert per_expert == {j: 3 * 32 * 34 for j in range(3)}  # D = FF = 32: each of 3 matrices 32 rows of 1 block
    engine = Engine.load(gguf_file, expert_budget="25%")
    greedy(engine)
    stats = engine.offloader.stats()
    engine.offloader.close()
    assert stats["transfers"] > 0
    for j, layer in enumerate(stats["layers"]):
        assert layer["bytes_moved"] == layer["transfers"] * per_expert[j]
    assert stats["bytes_moved"] < stats["transfers"] * (3 * D * FF * 4)  # the fp32 slots' size: what was counted before


def test_cli_generate_a_gguf_file_offloaded_and_requantized(gguf_file, capsys):
    argv = ["generate", str(gguf_file), "--prompt", "ab", "--max-new-tokens", "5", "--temperature", "0", "--quantize", "int8"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--expert-budget", "50%", "--stats"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(plain.rstrip("\n")) and "experts stored as int8" in out


def _logits(model, ids=torch.tensor([[3, 100, 7, 250, 42, 9, 9, 18]])):
    with torch.no_grad():
        return model(ids).logits


def test_gguf_requantized_int8_is_the_hand_quantized_model_and_near_fp32(gguf_file):
    from moekit.moe import native

    with native.off():  # fp32 activations, as the hand-quantized twin's (native's int8 activations: test_native.py)
        _requantized_case(gguf_file)


def _requantized_case(gguf_file):
    import moekit.gguf as G

    fp32 = G.load(gguf_file, blocks=False)  # every tensor dequantized (Engine.load keeps the blocks)
    int8 = Engine.load(gguf_file, quantize="int8").model
    twin = copy.deepcopy(fp32)  # gguf's dequantized experts, quantized to int8 by hand
    spec = QuantSpec(bits=8)
    with torch.no_grad():
        for layer in twin.layers:
            for p in (layer.mlp.experts.w_in_EHD, layer.mlp.experts.w_out_EDF):
                p.copy_(dequantize(quantize(p, spec), spec))
    got, base = _logits(int8), _logits(fp32)
    torch.testing.assert_close(got, _logits(twin), atol=1e-4, rtol=1e-4)
    err = (got - base).abs().max() / base.abs().max()
    assert 0 < err < 0.02, err  # int8 per channel: within 2% of the logit range of the fp32 (dequantized GGUF) model


# ---------------------------------------------------------------- bad input and the CLI


def test_bad_input_one_clear_message_each(run, capsys):
    with pytest.raises(MoekitError, match=r"low_bit_fallback only apply with an expert budget"):
        Engine.load(run, low_bit_fallback=True)
    with pytest.raises(MoekitError, match=r"quantize='int3' is unknown: accepted values are int8, int4"):
        Engine.load(run, quantize="int3", expert_budget="25%")
    argv = ["generate", str(run), "--prompt", "ab", "--max-new-tokens", "4", "--temperature", "0"]
    assert main(argv + ["--low-bit-fallback"]) == 2
    err = capsys.readouterr().err
    assert "--low-bit-fallback need --expert-budget" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(argv + ["--quantize", "int3"])
    err = capsys.readouterr().err
    assert "invalid choice: 'int3'" in err and "'int8', 'int4'" in err


def test_cli_generate_offloaded_quantized(run, capsys):
    argv = ["generate", str(run), "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "0", "--quantize", "int4"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main(argv + ["--expert-budget", "25%", "--stats"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(plain.rstrip("\n")) and "experts stored as int4-g32" in out and "moved" in out
    assert main(argv + ["--expert-budget", "25%", "--low-bit-fallback", "--stats"]) == 0
    assert "low-bit fallback:" in capsys.readouterr().out


PEAK = """
import json, sys
import torch
import moekit.hf, moekit.infer.chat, moekit.infer.offload, moekit.models.build, moekit.quantize  # runtime + numba first
from moekit.infer import Engine
from moekit.infer.sampling import SamplingConfig

def peak():  # VmHWM: this process's own peak RSS
    line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

torch.ones(1)
before = peak()
budget = None if sys.argv[2] == "none" else sys.argv[2]
engine = Engine.load(sys.argv[1], expert_budget=budget, quantize="int4", **({"spill_dir": sys.argv[3]} if budget else {}))
engine.generate_ids([[1, 2, 3]], SamplingConfig(max_new_tokens=3, temperature=0, stop_token_ids=[]))
print(json.dumps({"growth": peak() - before}))
"""


@pytest.mark.slow
def test_quantize_at_load_with_a_budget_never_holds_the_experts_in_full_precision(tmp_path):
    """Experts of 200 MB fp32 (31 MB int4): with or without a budget each expert is quantized as it is read, so
    RSS grows by far less than the fp32 experts weigh."""
    import json
    import subprocess
    import sys

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=4, max_seq_len=64,
                      moe=MoEConfig(num_experts=16, top_k=2, expert_hidden=1024))
    with torch.no_grad():
        model = DecoderLM(cfg)
    expert_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    save_checkpoint(tmp_path / "big", 1, config={"model": to_dict(cfg)}, model_state=model.state_dict(), optimizer_state=None,
                    trainer_state={}, tokenizer=Tokenizer.byte_level())
    del model
    growth = {}
    for budget in ("none", "25%"):
        out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "big"), budget, str(tmp_path)], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        growth[budget] = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    int4_bytes = expert_bytes * 1920 / 12288  # (the packing ratio of test_bytes_moved_per_miss_are_the_packed_bytes)
    one_layer_fp32 = expert_bytes / cfg.num_layers
    # runtime allowance: the loader plus numba compiling the int4 kernels (~60 MB). Resident quantize-at-load reads and
    # quantizes one expert at a time too (test_lazy_load checks it against a hand count), so neither run ever holds
    # the fp32 experts: both grow by far less than they weigh.
    assert growth["none"] < min(expert_bytes, int4_bytes + one_layer_fp32 + 100e6), (growth, expert_bytes)
    assert growth["25%"] < 0.25 * int4_bytes + 200e6, (growth, expert_bytes)
