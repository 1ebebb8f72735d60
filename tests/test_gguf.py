"""GGUF in and out (moekit.gguf): export -> import round trips per family and weight type, a Q4_K/Q6_K/BF16
file written with the gguf package itself, the CLI (`convert --to gguf`, `generate FILE.gguf`), bad input.

Oracles: the exported model's own logits (F32: exact); the model whose weights are
gguf.quants.dequantize(gguf.quants.quantize(w)) (Q8_0/Q4_0: equal logits); for Q4_K/Q6_K/BF16 the same
tensors dequantized by gguf and written as F32. llama.cpp itself is checked in benchmarks/gguf_parity.py.
"""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

import moekit.gguf as G  # noqa: E402
from moekit.cli.main import main  # noqa: E402
from moekit.config import MoEConfig  # noqa: E402
from moekit.data.text import Tokenizer  # noqa: E402
from moekit.errors import CheckpointError  # noqa: E402
from moekit.infer import Engine  # noqa: E402
from moekit.models.decoder import DecoderLM, ModelConfig  # noqa: E402
from moekit.quantize import set_kernel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = dict(vocab_size=257, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
FAMILIES = {
    "mixtral": dict(moe=dict(expert_hidden=64, norm_topk_prob=True)),
    "qwen2_moe": dict(qkv_bias=True, moe=dict(expert_hidden=32, num_shared_experts=1, shared_expert_hidden=64, shared_expert_gate=True, norm_topk_prob=False)),
    "qwen3_moe": dict(qk_norm="head", moe=dict(expert_hidden=32, norm_topk_prob=True)),
    "olmoe": dict(qk_norm="full", num_kv_heads=4, moe=dict(expert_hidden=32, norm_topk_prob=False)),
}
IDS = torch.tensor([[3, 100, 7, 250, 42, 9, 9, 18, 77, 5]])


def make_model(family: str, **over) -> DecoderLM:
    spec = copy.deepcopy(FAMILIES[family])
    moe = dict(hidden_size=over.get("hidden_size", 64), num_experts=4, top_k=2, **spec.pop("moe"))
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(**{**BASE, **spec, **over}, moe=MoEConfig(**moe))).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)  # norms and biases away from their trivial init
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_f32_round_trip_is_exact_and_f16_close(family, tmp_path):
    model = make_model(family)
    G.save(model, tmp_path / "m.gguf", Tokenizer.byte_level(), dtype="F32")
    back = G.load(tmp_path / "m.gguf")
    assert back.cfg.qk_norm == model.cfg.qk_norm and back.cfg.moe.num_shared_experts == model.cfg.moe.num_shared_experts
    assert torch.equal(logits(back), logits(model))
    G.save(model, tmp_path / "h.gguf", dtype="F16")
    torch.testing.assert_close(logits(G.load(tmp_path / "h.gguf")), logits(model), atol=2e-2, rtol=2e-2)


def _twin(model, qtype) -> DecoderLM:
    """The model with every quantized matrix replaced by gguf's dequantize(quantize(w)) (routers stay fp32)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if p.dim() >= 2 and "router" not in name and "shared_gate" not in name:
                w = p.detach().numpy()
                p.copy_(torch.from_numpy(dequantize(quantize(w, qtype), qtype).reshape(w.shape)))
    return twin


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", ["Q8_0", "Q4_0"])
def test_quantized_export_equals_dequantized_twin(family, dtype, tmp_path):
    model = make_model(family)
    G.save(model, tmp_path / "q.gguf", dtype=dtype)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert types["blk.0.ffn_gate_exps.weight"] == Q[dtype] and types["blk.0.ffn_gate_inp.weight"] == Q.F32
    back, twin = G.load(tmp_path / "q.gguf", blocks=False), _twin(model, Q[dtype])  # (blocks: tests/test_gguf_blocks.py)
    assert torch.equal(logits(back), logits(twin))
    assert not torch.equal(logits(back), logits(model))  # the quantization did happen


def _random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Valid random Q4_K / Q6_K blocks: random bytes with small fp16 scales where the format keeps them."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.full((rows, cols // block, 1), 0.002, dtype=np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d, dmin at the front
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    else:  # Q6_K: d at the end
        raw[..., size - 2:] = scale
    return raw.reshape(rows, -1)


def test_k_quant_file_written_by_gguf_decodes_like_its_fp32_twin(tmp_path):
    model = make_model("mixtral", hidden_size=256, num_layers=1)
    G.save(model, tmp_path / "f32.gguf", Tokenizer.byte_level(), dtype="F32")
    reader, rng = gguf.GGUFReader(str(tmp_path / "f32.gguf")), np.random.default_rng(0)
    wq, wf = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama"), gguf.GGUFWriter(str(tmp_path / "twin.gguf"), "llama")
    for f in reader.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            for w in (wq, wf):
                w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    kinds = {"ffn_gate_exps": Q.Q4_K, "ffn_up_exps": Q.Q6_K, "output": Q.Q4_K, "attn_q": Q.BF16, "token_embd": Q.Q6_K}
    seen = set()
    for t in reader.tensors:
        data = np.array(t.data)
        qtype = next((q for k, q in kinds.items() if t.name.split(".")[-2] == k), None)
        if qtype is None:
            stored, values = data, data
        else:
            rows = data.reshape(-1, data.shape[-1])
            stored = quantize(rows, qtype).view(np.uint8) if qtype == Q.BF16 else _random_blocks(qtype, *rows.shape, rng)
            values = dequantize(stored, qtype).reshape(data.shape)
            stored = stored.reshape(*data.shape[:-1], -1)
            seen.add(qtype)
        wq.add_tensor(t.name, stored, raw_dtype=qtype or Q.F32)
        wf.add_tensor(t.name, np.ascontiguousarray(values, dtype=np.float32), raw_dtype=Q.F32)
    for w in (wq, wf):
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert seen == {Q.Q4_K, Q.Q6_K, Q.BF16}
    a, b = Engine.load(tmp_path / "k.gguf"), Engine.load(tmp_path / "twin.gguf")
    set_kernel(a.model, "dequant")  # its blocks through the reference kernel (native: tests/test_gguf_blocks.py)
    assert torch.equal(logits(a.model), logits(b.model))
    assert a.generate([[1, 2, 3]], max_new_tokens=6)[0].token_ids == b.generate([[1, 2, 3]], max_new_tokens=6)[0].token_ids


def test_cli_convert_to_gguf_then_generate(tmp_path, capsys):
    from moekit import hf

    model = make_model("qwen3_moe")
    hf.save(model, tmp_path / "hf", tokenizer=Tokenizer.byte_level())
    assert main(["convert", "--to", "gguf", "--gguf-type", "Q8_0", str(tmp_path / "hf"), str(tmp_path / "m.gguf")]) == 0
    assert G.is_gguf(tmp_path / "m.gguf")
    engine = Engine.load(tmp_path / "m.gguf")
    assert engine.tokenizer.decode(engine.tokenizer.encode("héllo")) == "héllo"
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "m.gguf"), "--prompt", "ab", "--max-new-tokens", "3"]) == 0
    expected = engine.generate("ab", max_new_tokens=3)[0].text
    assert capsys.readouterr().out == "ab" + expected + "\n"


def test_unsupported_architecture_and_truncated_file_one_message(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(G.UnsupportedGGUFError, match="general.architecture='gpt2' is not supported"):
        Engine.load(tmp_path / "gpt2.gguf")
    G.save(make_model("olmoe"), tmp_path / "ok.gguf")
    raw = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        G.load(tmp_path / "cut.gguf")
    run = subprocess.run([sys.executable, "-m", "moekit", "generate", str(tmp_path / "cut.gguf"), "--prompt", "x"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_unfit_model_is_refused_and_nothing_written(tmp_path):
    model = make_model("qwen3_moe", dense_layers=[0])  # llama.cpp's MoE graphs have no dense layers
    with pytest.raises(G.UnsupportedGGUFError, match="dense layers"):
        G.save(model, tmp_path / "x.gguf")
    with pytest.raises(Exception, match="gguf dtype='Q5_K' is unknown"):
        G.save(make_model("olmoe"), tmp_path / "y.gguf", dtype="Q5_K")
    assert list(tmp_path.iterdir()) == []


def test_a_saved_gguf_file_honours_the_umask(tmp_path):
    """Issue 25: files were written 0600 (tempfile.mkstemp's mode) under umask 022."""
    import os

    old = os.umask(0o022)
    try:
        path = G.save(make_model("mixtral"), tmp_path / "m.gguf", Tokenizer.byte_level())
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
