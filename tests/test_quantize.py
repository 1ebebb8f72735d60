"""Weight-only quantization: formats, kernels, the transform, quantized checkpoints and their bad input.

Oracles: hand computations on tiny matrices (the format and the dequantize
reference), resident fp32 `Experts` / nn.Linear holding the dequantized
weights (the `dequant` kernel), and the `dequant` kernel itself for the
numba kernels. fp32 tolerance for numba vs dequant: |diff| <= 1e-5 * max|y|
+ 1e-6 (both accumulate in fp32, in different orders).
"""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from moekit.cli.main import main
from moekit.errors import CheckpointError, ConfigError
from moekit.infer import Engine
from moekit.models.build import load_model
from moekit.moe import quant_kernels
from moekit.moe.experts import Experts
from moekit.moe.quant_format import QuantSpec, dequantize, quantize
from moekit.moe.quantized import QuantizedExperts, QuantizedLinear
from moekit.quantize import quantize_model, set_kernel

pytestmark = pytest.mark.usefixtures("one_thread")
needs_numba = pytest.mark.skipif(not quant_kernels.AVAILABLE, reason="numba is not installed")
SPECS = [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 64, symmetric=False)]


def close(a, b):
    assert a.shape == b.shape
    if b.numel() == 0:
        return
    tol = 1e-5 * float(b.abs().max()) + 1e-6
    assert float((a - b).abs().max()) <= tol, (float((a - b).abs().max()), tol)


# ---------------------------------------------------------------- the format, by hand


def test_int8_per_channel_by_hand():
    w = torch.tensor([[1.27, 0.333], [0.0, 0.0]])
    t = quantize(w, QuantSpec(8))
    assert t["q"].tolist() == [[127, 33], [0, 0]] and t["q"].dtype == torch.int8
    assert torch.allclose(t["scale"], torch.tensor([[0.01], [1.0]]))
    w_hat = dequantize(t, QuantSpec(8))
    assert torch.allclose(w_hat, torch.tensor([[1.27, 0.33], [0.0, 0.0]]))
    assert torch.allclose(w_hat @ torch.tensor([2.0, 1.0]), torch.tensor([2 * 1.27 + 0.33, 0.0]))


def test_int4_symmetric_group_by_hand():
    w = torch.zeros(1, 32)
    w[0, :3] = torch.tensor([0.7, -0.33, 0.12])  # absmax 0.7 -> scale 0.1; q = 7, -3, 1
    t = quantize(w, QuantSpec(4, 32))
    assert torch.allclose(t["scale"], torch.tensor([[0.1]]))
    # codes q + 8 = 15, 5, 9, 8, ...; two per byte, even column in the low nibble
    assert t["q"][0, :2].tolist() == [15 | 5 << 4, 9 | 8 << 4] and t["q"].shape == (1, 16)
    w_hat = dequantize(t, QuantSpec(4, 32))
    expected = torch.zeros(1, 32)
    expected[0, :3] = torch.tensor([0.7, -0.3, 0.1])
    assert torch.allclose(w_hat, expected, atol=1e-6)
    assert torch.allclose(w_hat @ torch.ones(32), torch.tensor([0.5]), atol=1e-6)


def test_int4_zero_point_group_by_hand():
    w = torch.zeros(1, 32)
    w[0, :2] = torch.tensor([1.2, -0.3])  # range [-0.3, 1.2] -> scale 0.1, zero 3
    t = quantize(w, QuantSpec(4, 32, symmetric=False))
    assert torch.allclose(t["scale"], torch.tensor([[0.1]])) and t["zero"].tolist() == [[3]]
    assert t["q"][0, 0].item() == 15 | 0 << 4 and t["q"][0, 1].item() == 3 | 3 << 4
    assert torch.allclose(dequantize(t, QuantSpec(4, 32, symmetric=False))[0, :3], torch.tensor([1.2, -0.3, 0.0]), atol=1e-6)


# ---------------------------------------------------------------- kernels


def _experts(activation="swiglu"):
    torch.manual_seed(0)
    return Experts(4, 64, 128, activation=activation)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_dequant_kernel_equals_fp32_experts_with_the_dequantized_weights(spec, activation):
    ex = _experts(activation)
    qe = QuantizedExperts(ex, spec, kernel="dequant")
    ref = Experts(4, 64, 128, activation=activation)
    with torch.no_grad():
        ref.w_in_EHD.copy_(dequantize({"q": qe.w_in_EHD_q, "scale": qe.w_in_EHD_scale,
                                       **({"zero": qe.w_in_EHD_zero} if spec.has_zero else {})}, spec))
        ref.w_out_EDF.copy_(dequantize({"q": qe.w_out_EDF_q, "scale": qe.w_out_EDF_scale,
                                        **({"zero": qe.w_out_EDF_zero} if spec.has_zero else {})}, spec))
        x, counts = torch.randn(9, 64), torch.tensor([3, 0, 1, 5])
        close(qe(x, counts), ref(x, counts, kernel="loop"))


@needs_numba
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("counts", [[1, 0, 1, 0], [3, 0, 1, 5], [0, 0, 0, 0]])
def test_numba_kernel_equals_the_dequant_reference(spec, counts):
    qe = QuantizedExperts(_experts(), spec)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 64)
    with torch.no_grad():
        close(qe(x, counts, kernel="numba"), qe(x, counts, kernel="dequant"))
        y16 = qe(x.bfloat16(), counts, kernel="numba")
    assert y16.dtype == torch.bfloat16


@needs_numba
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_serial_and_parallel_numba_kernels_agree_with_the_dequant_reference(spec):
    """One thread runs the serial kernels, more the prange ones (one body): both equal `dequant`, and each other."""
    qe = QuantizedExperts(_experts(), spec)
    counts = torch.tensor([3, 0, 1, 5])
    x = torch.randn(int(counts.sum()), 64)
    with torch.no_grad():
        ref = qe(x, counts, kernel="dequant")
        serial = qe(x, counts, kernel="numba")  # the one_thread fixture: the serial kernels
        torch.set_num_threads(2)
        try:
            parallel = qe(x, counts, kernel="numba")
        finally:
            torch.set_num_threads(1)
    close(serial, ref)
    close(parallel, ref)
    close(parallel, serial)


@needs_numba
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_quantized_linear_numba_equals_dequant_and_a_linear_of_the_dequantized_weight(spec):
    torch.manual_seed(1)
    lin = nn.Linear(128, 48)
    ql = QuantizedLinear(lin, spec)
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        ql.kernel = "dequant"
        y_ref = ql(x)
        ref = nn.Linear(128, 48)
        parts = {"q": ql.weight_q, "scale": ql.weight_scale, **({"zero": ql.weight_zero} if spec.has_zero else {})}
        ref.weight.copy_(dequantize(parts, spec)[0])
        ref.bias.copy_(lin.bias)
        close(y_ref, ref(x))
        ql.kernel = "numba"
        close(ql(x), y_ref)


def test_auto_picks_native_at_any_row_count_else_numba_for_few_rows_and_dequant_for_many():
    from moekit.moe import native

    qe = QuantizedExperts(_experts(), QuantSpec(4, 32))
    x = torch.zeros(1, 64)
    few = qe.kernel_for(x, torch.tensor([1, 0, 1, 0]))
    vector = native.isa() not in ("generic", "none")  # the compiled kernels, where a vector build runs here
    assert few == ("native" if vector else "numba" if quant_kernels.AVAILABLE else "dequant")
    assert qe.kernel_for(x, torch.tensor([500, 0, 1, 0])) == ("native" if vector else "dequant")  # (quant_kernels.md: 512 rows)
    with native.off():
        assert qe.kernel_for(x, torch.tensor([500, 0, 1, 0])) == "dequant"
    with pytest.raises(ConfigError, match="accepted values are auto, dequant, numba, native"):
        qe.kernel_for(x, None, kernel="bmm")


# ---------------------------------------------------------------- a model: transform, checkpoints, generation


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real (4-step) tiny `moekit train` run with a shared expert."""
    from moekit.train.lm import resolve_run_config, train_lm

    root = tmp_path_factory.mktemp("qtrain")
    (root / "data.txt").write_text("def add(a, b):\n    return a + b\n" * 200)
    cfg = resolve_run_config("tiny", overrides=[
        "train.steps=4", "train.eval_every=4", "train.save_every=4", "train.eval_batches=1", "train.seq_len=32",
        "moe.num_shared_experts=1", "train.device=cpu"], data=str(root / "data.txt"))
    train_lm(replace(cfg, train=replace(cfg.train, batch_size=2)), root / "run", progress=False)
    return root / "run"


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 250, 1]])


@pytest.mark.parametrize("flags", [["--bits", "8"], ["--bits", "4", "--zero-point", "--scope", "all"]], ids=["int8", "int4-zp-all"])
def test_quantize_save_load_round_trip_gives_identical_logits(run, tmp_path, capsys, flags):
    code, out, err = cli(capsys, "quantize", run, *flags, "--out", tmp_path / "q")
    assert code == 0, err
    section = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert section["bits"] == int(flags[1])
    loaded, _, _ = load_model(tmp_path / "q")
    fresh, _, _ = load_model(run)
    quantize_model(fresh, bits=int(flags[1]), symmetric="--zero-point" not in flags,
                   scope="all" if "all" in flags else "experts")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, fresh(IDS).logits)
    kinds = {type(m).__name__ for m in loaded.modules()}
    assert "QuantizedExperts" in kinds and ("QuantizedLinear" in kinds) == ("all" in flags)
    assert type(loaded.layers[0].mlp.router.gate) is nn.Linear  # the router stays full precision


@needs_numba
def test_generation_runs_and_is_greedy_equal_between_kernels(run, tmp_path, capsys):
    assert cli(capsys, "quantize", run, "--bits", "4", "--out", tmp_path / "q4")[0] == 0
    engine = Engine.load(tmp_path / "q4")
    tokens = {}
    for kernel in ("numba", "dequant"):
        set_kernel(engine.model, kernel)
        tokens[kernel] = engine.generate(["def "], max_new_tokens=12, temperature=0)[0].token_ids
    assert tokens["numba"] == tokens["dequant"] and len(tokens["numba"]) == 12
    at_load = Engine.load(run, quantize="int4").generate(["def "], max_new_tokens=12, temperature=0)[0].token_ids
    assert at_load == tokens["numba"]  # load-time int4 = the int4 checkpoint (group 32, symmetric)
    code, out, err = cli(capsys, "generate", run, "--quantize", "int8", "--prompt", "def ", "--max-new-tokens", "6",
                         "--temperature", "0")
    assert code == 0 and out.startswith("def "), err
    code, out, err = cli(capsys, "inspect", tmp_path / "q4")
    assert code == 0 and "validation loss" in out, err
    fp32_total = cli(capsys, "inspect", run)[1].splitlines()[1]
    assert out.splitlines()[1] == fp32_total  # quantized weights count as the weights they stand for


def test_int8_and_int4_loss_increase_is_small(run):
    """Quality: next-token loss on the training text, fp32 vs quantized (targets of issue 12, loosely)."""
    text = "def add(a, b):\n    return a + b\n" * 8
    model, tok, _ = load_model(run)
    ids = torch.tensor([tok.encode(text)[:128]])
    losses = {}
    with torch.no_grad():
        losses["fp32"] = _loss(model, ids)
        for name, opts in {"int8": dict(bits=8), "int4": dict(bits=4, group_size=32)}.items():
            m, _, _ = load_model(run)
            losses[name] = _loss(quantize_model(m, **opts), ids)
    assert losses["int8"] <= losses["fp32"] * 1.003, losses
    assert losses["int4"] <= losses["fp32"] * 1.02, losses


def _loss(model, ids):
    logits = model(ids[:, :-1]).logits
    return float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]))


# ---------------------------------------------------------------- bad input


def test_bits_3_is_refused(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(run), "--bits", "3", "--out", str(tmp_path / "q")])
    assert e.value.code == 2 and "invalid choice: 3" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="bits=3 is not supported: accepted values are 8"):
        quantize_model(nn.Module(), bits=3)
    assert not (tmp_path / "q").exists()


def test_a_group_size_that_does_not_divide_the_width_is_refused(run, tmp_path, capsys):
    code, out, err = cli(capsys, "quantize", run, "--bits", "4", "--group-size", "64", "--out", tmp_path / "q")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "group_size=64 does not divide the input width 96" in err and "group sizes that divide it: 32" in err
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".tmp-*"))
    model, _, _ = load_model(run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="does not divide"):
        quantize_model(model, bits=4, group_size=128)
    assert model.state_dict().keys() == before.keys()  # left as it was
    assert getattr(model, "quantization", None) is None


def test_a_quantized_checkpoint_missing_a_scale_is_named(run, tmp_path, capsys):
    assert cli(capsys, "quantize", run, "--bits", "8", "--out", tmp_path / "q")[0] == 0
    path = tmp_path / "q" / "model.safetensors"
    state = load_file(path)
    del state["layers.1.mlp.experts.w_out_EDF_scale"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lacks the quantized tensor.*layers.1.mlp.experts.w_out_EDF_scale"):
        load_model(tmp_path / "q")
    code, out, err = cli(capsys, "generate", tmp_path / "q", "--prompt", "x", "--max-new-tokens", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "w_out_EDF_scale" in err
    code, out, err = cli(capsys, "quantize", run, "--bits", "8", "--out", tmp_path / "q")
    assert code == 2 and "already exists" in err  # nothing overwritten


def test_load_time_quantize_refuses_an_unknown_width(run):
    with pytest.raises(ConfigError, match="quantize='int2' is unknown: accepted values are int8, int4"):
        Engine.load(run, quantize="int2")


def test_a_hugging_face_directory_quantizes_like_load_time_quantization(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from moekit.data.text import Tokenizer

    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        "qwen2_moe", vocab_size=260, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, max_position_embeddings=64, eos_token_id=256, initializer_range=0.2)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    Tokenizer.byte_level().save(tmp_path / "hf")
    code, out, err = cli(capsys, "quantize", tmp_path / "hf", "--bits", "8", "--out", tmp_path / "q")
    assert code == 0, err
    with torch.no_grad():
        saved = Engine.load(tmp_path / "q").model(IDS).logits
        at_load = Engine.load(tmp_path / "hf", quantize="int8").model(IDS).logits
    assert torch.equal(saved, at_load)
