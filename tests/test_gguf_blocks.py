"""GGUF weights in their own block formats (moekit.gguf.blocks / storage / block_load): formats, storages,
loading, offloading, memory, errors.

Oracles, all independent of the code under test: gguf-py's own `gguf.quants.dequantize` (the formats, bit
for bit); `loop` and the resident fp32 `Experts` / `F.linear` on gguf-dequantized weights (the storages'
`dequant` kernel); the same file loaded with every tensor dequantized to fp32 (`load(blocks=False)`, the
path moekit had before: logits equal bit for bit through `dequant`, within the int8-activation error
through `native`); tensor sizes from the file's type and shape (resident bytes); /proc VmHWM of a child
process (peak memory of a load).
"""

import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")
from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

import moekit.gguf as G  # noqa: E402
from moekit.config import MoEConfig  # noqa: E402
from moekit.data.text import Tokenizer  # noqa: E402
from moekit.errors import CheckpointError, ConfigError  # noqa: E402
from moekit.gguf import blocks as B  # noqa: E402
from moekit.gguf.storage import GGUFExperts, GGUFLinear  # noqa: E402
from moekit.infer import Engine  # noqa: E402
from moekit.models.decoder import DecoderLM, ModelConfig  # noqa: E402
from moekit.moe import native  # noqa: E402
from moekit.moe.experts import Experts, loop_experts  # noqa: E402
from moekit.quantize import set_kernel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TYPES = list(B.BLOCK_TYPES)
IDS = torch.tensor([[3, 100, 7, 250, 42, 9, 9, 18, 77, 5]])
needs_native = pytest.mark.skipif(not native.AVAILABLE, reason="the native kernels (moekit.moe._qdot) are not built")


def random_blocks(qtype: str, rows: int, cols: int, rng) -> np.ndarray:
    """Valid `qtype` rows [rows, row_bytes]: gguf-py's quantizer where it has one (of random weights; half the
    rows random bytes with small scales, to reach every code), else random bytes with small fp16 scales."""
    block, size = GGML_QUANT_SIZES[Q[qtype]]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = rng.uniform(-0.02, 0.02, size=(rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if qtype in ("Q4_K", "Q5_K", "Q4_1", "Q8_1"):  # d and dmin (or m / s) at the front
        raw[..., 0:4] = scale.reshape(rows, cols // block, 4)
    elif qtype == "Q6_K":  # d at the end
        raw[..., size - 2:] = scale[..., :2]
    else:
        raw[..., 0:2] = scale[..., :2]
    raw = raw.reshape(rows, -1)
    try:
        half = rows // 2
        raw[:half] = quantize(rng.standard_normal((half, cols)).astype(np.float32) * 0.05, Q[qtype]).reshape(half, -1)
    except NotImplementedError:
        pass
    return raw


def gguf_fp32(raw: np.ndarray, qtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(dequantize(raw, Q[qtype]), dtype=np.float32))


# ---------------------------------------------------------------- the formats


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("cols", [256, 512])
def test_torch_dequantize_is_gguf_py_bit_for_bit(qtype, cols):
    rng = np.random.default_rng(cols)
    raw = random_blocks(qtype, 3 * 5, cols, rng).reshape(3, 5, -1)  # E=3 experts of 5 rows
    got = B.dequantize(torch.from_numpy(raw), qtype)
    want = gguf_fp32(raw.reshape(15, -1), qtype).reshape(3, 5, cols)
    assert got.shape == (3, 5, cols) and torch.equal(got, want)
    assert B.row_bytes(qtype, cols) == raw.shape[-1] and B.row_width(qtype, raw.shape[-1]) == cols


# ---------------------------------------------------------------- the storages


def block_experts(types, E=3, D=256, F_=512, seed=0):
    """A GGUFExperts of random blocks, and its fp32 (w_in [E, 2F, D], w_out [E, D, F]) by gguf-py."""
    rng = np.random.default_rng(seed)
    gate, up, down = (random_blocks(q, E * r, c, rng) for q, r, c in zip(types, (F_, F_, D), (D, D, F_)))
    experts = GGUFExperts.empty(E, D, F_, "swiglu", types, kernel="dequant")
    g, u, d = (torch.from_numpy(x).reshape(E, -1, x.shape[-1]) for x in (gate, up, down))
    if experts.fused:
        experts.w_in_EHB.copy_(torch.cat((g, u), dim=1))
    else:
        experts.w_gate_EFB.copy_(g)
        experts.w_up_EFB.copy_(u)
    experts.w_out_EDB.copy_(d)
    w_in = torch.cat((gguf_fp32(gate, types[0]).reshape(E, F_, D), gguf_fp32(up, types[1]).reshape(E, F_, D)), dim=1)
    return experts, w_in, gguf_fp32(down, types[2]).reshape(E, D, F_)


TYPE_SETS = [("Q8_0",) * 3, ("Q4_0",) * 3, ("Q5_0",) * 3, ("Q4_K", "Q4_K", "Q6_K"), ("Q4_K", "Q6_K", "Q5_0")]


@pytest.mark.parametrize("types", TYPE_SETS, ids="/".join)
@pytest.mark.parametrize("rows", [[2, 0, 3], [1, 0, 1], [0, 0, 0]], ids=["prefill", "decode", "none"])
def test_gguf_experts_dequant_is_the_fp32_experts_on_gguf_py_weights(types, rows):
    experts, w_in, w_out = block_experts(types)
    assert experts.fused == (types[0] == types[1])
    rows_E = torch.tensor(rows)
    x = torch.randn(int(rows_E.sum()), 256, generator=torch.Generator().manual_seed(1))
    fp32 = Experts(3, 256, 512, kernel="auto")
    with torch.no_grad(), native.off():  # (torch's float kernels on both sides; native's fp32 path: test_native.py)
        fp32.w_in_EHD.copy_(w_in)
        fp32.w_out_EDF.copy_(w_out)
        got = experts(x, rows_E)
        assert torch.equal(got, fp32(x, rows_E))  # the same arithmetic as the fp32 model (same kernel choice)
        torch.testing.assert_close(got, loop_experts(x, rows_E, w_in, w_out, "swiglu"), atol=1e-5, rtol=1e-5)
    assert experts.num_weights == fp32.num_weights
    assert sum(b.numel() for b in experts.buffers()) == sum(
        3 * r * B.row_bytes(q, c) for q, r, c in zip(types, (512, 512, 256), (256, 256, 512)))


@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_linear_dequant_is_nn_linear_on_gguf_py_weights(qtype):
    rng = np.random.default_rng(2)
    raw = random_blocks(qtype, 5, 512, rng)
    bias = torch.nn.Parameter(torch.randn(5))
    lin = GGUFLinear(512, 5, qtype, bias, kernel="dequant")
    lin.weight_OB.copy_(torch.from_numpy(raw)[None])
    x = torch.randn(2, 3, 512)
    with torch.no_grad():
        assert torch.equal(lin(x), F.linear(x, gguf_fp32(raw, qtype), bias))


@needs_native
@pytest.mark.parametrize("types", TYPE_SETS, ids="/".join)
def test_native_equals_dequant_to_int8_activation_rounding(types):
    experts, _, _ = block_experts(types)
    rows_E = torch.tensor([2, 0, 3])
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(3))
    assert experts.kernel_for(x, rows_E, "auto") == "native"
    with torch.no_grad():
        want, got = experts(x, rows_E, kernel="dequant"), experts(x, rows_E, kernel="native")
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    lin = GGUFLinear(256, 7, types[0])
    lin.weight_OB.copy_(torch.from_numpy(random_blocks(types[0], 7, 256, np.random.default_rng(4)))[None])
    with torch.no_grad():
        want = F.linear(x, lin.dequantized())
        got = lin(x)
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_native_off_or_elsewhere_runs_dequant():
    experts, _, _ = block_experts(("Q8_0",) * 3)
    x = torch.zeros(2, 256)
    with native.off():
        assert experts.kernel_for(x) == "dequant"
    assert experts.kernel_for(x.to("meta")) == "dequant"


# ---------------------------------------------------------------- loading


def make_model(family: str = "mixtral", **over) -> DecoderLM:
    spec = {"mixtral": dict(moe=dict(norm_topk_prob=True)),
            "qwen2_moe": dict(qkv_bias=True, moe=dict(num_shared_experts=1, shared_expert_hidden=64, shared_expert_gate=True,
                                                      norm_topk_prob=False))}[family]
    moe = dict(hidden_size=64, num_experts=4, top_k=2, expert_hidden=64, **spec.pop("moe"))
    torch.manual_seed(0)
    base = dict(vocab_size=257, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
    model = DecoderLM(ModelConfig(**{**base, **spec, **over}, moe=MoEConfig(**moe))).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def block_bytes(path) -> int:
    """Bytes of the file's tensors in a block type moekit runs, except the token embedding (read as floats)."""
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors
               if t.tensor_type.name in B.BLOCK_TYPES and t.name != "token_embd.weight")


def resident_block_bytes(model) -> int:
    return sum(b.numel() for b in model.buffers() if b.dtype == torch.uint8)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("dtype", ["Q8_0", "Q4_0"])
def test_saved_model_loads_as_blocks_with_the_dequantized_models_logits(family, dtype, tmp_path):
    path = G.save(make_model(family), tmp_path / "m.gguf", Tokenizer.byte_level(), dtype=dtype)
    blocks, fp32 = G.load(path), G.load(path, blocks=False)
    kinds = {type(m).__name__ for m in blocks.modules()}
    assert {"GGUFExperts", "GGUFLinear"} <= kinds and "GGUFExperts" not in {type(m).__name__ for m in fp32.modules()}
    assert resident_block_bytes(blocks) == block_bytes(path)  # every block tensor resident at its file size, once
    assert not any(n.endswith(("w_in_EHD", "q_proj.weight")) for n, _ in blocks.named_parameters())
    want, auto = logits(fp32), logits(blocks)
    set_kernel(blocks, "dequant")
    assert torch.equal(logits(blocks), want)  # (mixtral: the llama arch's permuted Q/K rows of blocks)
    assert (auto - want).abs().max() <= 5e-2 * want.abs().max()  # native: int8 activations (dequant elsewhere)


def retyped(src, dst, kinds: dict, rng) -> None:
    """src's tensors written to dst with the types kinds[tensor kind] (e.g. {"ffn_up_exps": "Q6_K"}), others as they are."""
    reader = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), str(reader.fields["general.architecture"].contents()))
    for f in reader.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        qtype = kinds.get(t.name.split(".")[-2])
        data = np.array(t.data)
        if qtype is None:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
            continue
        rows = random_blocks(qtype, int(np.prod(data.shape[:-1])), data.shape[-1], rng)
        w.add_tensor(t.name, rows.reshape(*data.shape[:-1], -1), raw_dtype=Q[qtype])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def test_mixed_k_quant_file_blocks_fallback_types_and_offloading(tmp_path):
    src = G.save(_wide_model(), tmp_path / "f32.gguf", Tokenizer.byte_level())
    kinds = {"ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q6_K", "ffn_down_exps": "Q5_0", "attn_q": "Q4_K",
             "attn_v": "Q4_1", "output": "Q6_K", "token_embd": "Q4_K"}
    retyped(src, tmp_path / "k.gguf", kinds, np.random.default_rng(0))
    engine = Engine.load(tmp_path / "k.gguf")
    model = engine.model
    experts = model.layers[0].mlp.experts
    assert experts.qtypes == ("Q4_K", "Q6_K", "Q5_0") and not experts.fused
    assert isinstance(model.layers[0].self_attn.q_proj, GGUFLinear) and isinstance(model.lm_head, GGUFLinear)
    assert isinstance(model.layers[0].self_attn.v_proj, torch.nn.Linear)  # Q4_1: no block path, dequantized by gguf-py
    fp32 = G.load(tmp_path / "k.gguf", blocks=False)
    assert torch.equal(model.embed_tokens.weight, fp32.embed_tokens.weight)
    set_kernel(model, "dequant")
    assert torch.equal(logits(model), logits(fp32))
    set_kernel(model, "auto")
    want = engine.generate([[1, 2, 3]], max_new_tokens=8, temperature=0)[0].token_ids
    lazy = Engine.load(tmp_path / "k.gguf", expert_budget="50%")
    assert lazy.offloader.tier.kind == "gguf" and type(lazy.offloader._slots[0]).__name__ == "GGUFExperts"
    assert lazy.generate([[1, 2, 3]], max_new_tokens=8, temperature=0)[0].token_ids == want
    stats = lazy.offloader.stats()
    per_expert = sum(B.row_bytes(q, c) * r for q, r, c in zip(experts.qtypes, (256, 256, 256), (256, 256, 256)))
    assert stats["transfers"] > 0 and stats["bytes_moved"] == stats["transfers"] * per_expert
    assert "GGUF Q4_K/Q6_K/Q5_0" in str(stats["quantization"])
    lazy.offloader.close()


def _wide_model() -> DecoderLM:
    """Mixtral-like, every width a multiple of 256 (the K types' blocks)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
                      moe=MoEConfig(hidden_size=256, num_experts=4, top_k=2, expert_hidden=256, norm_topk_prob=True))
    model = DecoderLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
    return model


Q4_K_M = Path(__file__).parent / "data" / "tiny-mixtral-Q4_K_M.gguf"  # made by tests/data/make_q4km.py (llama.cpp's quantizer)


def test_llama_cpp_q4_k_m_file_runs_in_its_blocks():
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(Q4_K_M)).tensors}
    assert {"Q4_K", "Q6_K"} <= set(types.values()) <= {"Q4_K", "Q6_K", "F32"}
    engine = Engine.load(Q4_K_M)
    model = engine.model
    for i, layer in enumerate(model.layers):
        assert layer.mlp.experts.qtypes == tuple(types[f"blk.{i}.{w}.weight"] for w in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
        assert layer.self_attn.v_proj.qtype == types[f"blk.{i}.attn_v.weight"]
    assert model.lm_head.qtype == types["output.weight"] == "Q6_K"
    assert resident_block_bytes(model) == block_bytes(Q4_K_M)
    fp32 = G.load(Q4_K_M, blocks=False)
    want, auto = logits(fp32), logits(model)
    assert (auto - want).abs().max() <= 5e-2 * want.abs().max()  # native: int8 activations (dequant elsewhere)
    tokens = engine.generate([[1, 2, 3]], max_new_tokens=8, temperature=0)[0].token_ids
    assert len(tokens) == 8
    lazy = Engine.load(Q4_K_M, expert_budget="50%")
    assert lazy.generate([[1, 2, 3]], max_new_tokens=8, temperature=0)[0].token_ids == tokens
    lazy.offloader.close()
    set_kernel(model, "dequant")
    assert torch.equal(logits(model), want)


# ---------------------------------------------------------------- memory


def _rss_file(path, rng) -> int:
    """A llama-arch MoE file of random Q4_0 blocks (~95 MB: 7x that in fp32), written without an fp32 model."""
    from moekit.gguf.writer import _metadata

    D, Fx, E, L, V = 1024, 1536, 8, 4, 256
    cfg = ModelConfig(vocab_size=V, hidden_size=D, num_layers=L, num_heads=8, num_kv_heads=8, max_seq_len=64,
                      tie_embeddings=True, moe=MoEConfig(hidden_size=D, num_experts=E, top_k=2, expert_hidden=Fx,
                                                         norm_topk_prob=True))
    w = gguf.GGUFWriter(str(path), "llama")
    _metadata(w, cfg, "llama")
    w.add_tensor("token_embd.weight", rng.standard_normal((V, D), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))

    def q4_0(*shape):
        raw = rng.integers(0, 256, size=(*shape[:-1], shape[-1] // 32, 18), dtype=np.uint8)
        raw[..., 0:2] = np.full(1, 0.01, np.float16).view(np.uint8)
        return raw.reshape(*shape[:-1], -1)

    for i in range(L):
        b = f"blk.{i}."
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"{b}{name}.weight", np.ones(D, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"{b}{name}.weight", q4_0(D, D), raw_dtype=Q.Q4_0)
        w.add_tensor(f"{b}ffn_gate_inp.weight", rng.standard_normal((E, D), dtype=np.float32))
        w.add_tensor(f"{b}ffn_gate_exps.weight", q4_0(E, Fx, D), raw_dtype=Q.Q4_0)
        w.add_tensor(f"{b}ffn_up_exps.weight", q4_0(E, Fx, D), raw_dtype=Q.Q4_0)
        w.add_tensor(f"{b}ffn_down_exps.weight", q4_0(E, D, Fx), raw_dtype=Q.Q4_0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path.stat().st_size


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _load_in_child(path, queue) -> None:
    """(RSS before, peak RSS after, block bytes resident) of one resident block-format load, in this fresh process."""
    import gguf  # noqa: F401  (everything the load imports, imported before measuring)

    import moekit.gguf as G
    import moekit.hf.reader  # noqa: F401
    import moekit.models.build  # noqa: F401

    torch.set_num_threads(1)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = _status("VmRSS")
    model = G.load(path)
    queue.put((before, _status("VmHWM"), sum(b.numel() for b in model.buffers() if b.dtype == torch.uint8)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("file", ["Q4_0, 96 MB", "llama.cpp's Q4_K_M"])
def test_resident_block_load_peaks_at_about_the_file_size(tmp_path, file):
    if file.startswith("Q4_0"):
        path = tmp_path / "big.gguf"
        size = _rss_file(path, np.random.default_rng(0))
    else:  # the committed fixture (tests/data/make_q4km.py); the benchmark's memory table has a 1B one
        path = Q4_K_M
        size = sum(t.n_bytes for t in gguf.GGUFReader(str(path)).tensors  # its block tensors (the embedding is read as floats)
                   if t.tensor_type.name not in ("F32", "F16") and t.name != "token_embd.weight")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_load_in_child, args=(path, queue))
    child.start()
    before, peak, resident = queue.get(timeout=300)
    child.join(60)
    growth = peak - before
    print(f"file {size / 1e6:.1f} MB, resident blocks {resident / 1e6:.1f} MB, peak RSS growth {growth / 1e6:.1f} MB")
    assert resident > 0.95 * size  # the blocks are resident (not left in the memory map)
    assert growth <= size + 400e6  # fp32 weights would be ~7x the file (~670 MB more)


# ---------------------------------------------------------------- errors


def test_unknown_type_truncated_blocks_and_bad_storages_one_message_each(tmp_path):
    src = G.save(make_model(), tmp_path / "f32.gguf", Tokenizer.byte_level())
    retyped(src, tmp_path / "q81.gguf", {"attn_v": "Q8_1"}, np.random.default_rng(0))
    with pytest.raises(G.UnsupportedGGUFError, match=r"blk.0.attn_v.weight is stored as GGUF type Q8_1, which moekit cannot "
                                                     r"run: it runs Q8_0, Q4_0, Q5_0, Q4_K, Q6_K, Q5_K in block form"):
        Engine.load(tmp_path / "q81.gguf")
    run = subprocess.run([sys.executable, "-m", "moekit", "generate", str(tmp_path / "q81.gguf"), "--prompt", "x"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr and "Q8_1" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    path = G.save(make_model(), tmp_path / "q.gguf", dtype="Q8_0")
    raw = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match=r"cut.gguf is truncated or corrupt: tensor \S+ \((Q8_0|F32)\) needs \d+ bytes"):
        G.load(tmp_path / "cut.gguf")
    _truncated_after_open(path, tmp_path / "cut.gguf")
    with pytest.raises(ConfigError, match="activation='clamped_swiglu' cannot run from GGUF blocks"):
        GGUFExperts(2, 32, 32, ("Q8_0",) * 3, activation="clamped_swiglu")
    with pytest.raises(ConfigError, match="kernel='numba' is unknown for GGUF block weights: accepted values are auto, native, dequant"):
        GGUFLinear(32, 4, "Q8_0", kernel="numba")
    with pytest.raises(ConfigError, match="GGUF type 'Q4_1' has no block path; moekit runs Q8_0, Q4_0, Q5_0, Q4_K, Q6_K, Q5_K"):
        GGUFLinear(256, 4, "Q4_1")


def _truncated_after_open(path, cut) -> None:
    """A file cut short after its tensor table was read: the block copy names the tensor."""
    from moekit.gguf.block_load import read_blocks

    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_down_exps.weight")
    targets = [torch.empty(int(t.n_bytes) // 4, dtype=torch.uint8) for _ in range(4)]
    with pytest.raises(CheckpointError, match=r"cut.gguf is truncated: tensor blk.1.ffn_down_exps.weight needs \d+ bytes "
                                              r"of Q8_0 blocks"):
        read_blocks(cut, t, targets, None, "llama")
