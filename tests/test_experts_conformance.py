"""Every experts storage against the `loop` oracle: one suite over storage x activation x kernel (issue 22).

Source: one shared random resident `Experts` per activation (SwiGLU, GELU, GPT-OSS's clamped SwiGLU
with random biases; GELU with biases for moefy's encoder experts). Each case converts it into a storage
(resident; expert-parallel shards; moefy's encoder experts; int8 / int4 quantized; GGUF blocks;
offloaded on each slow tier with each slot kind; the low-bit fallback) and runs one routed input through
the two calls every MoE layer's dispatcher makes: `kernel = storage.kernel_for(x, rows_E)`, then
`storage(x, rows_E, kernel=kernel)`, once with several rows per expert (prefill) and once with one row per
active expert (decode). Oracle: `loop_experts`, the fp32 reference kernel, on the storage's own effective
weights (the source's for full precision; dequantized by moekit's quant_format / gguf-py's blocks for the
quantized and GGUF storages), with tests/quant_oracle.py's int8 rounding of both matmuls' inputs where
the call ran an integer-dot kernel (`native` on codes or blocks), at test_native.py's tolerance. A
combination a storage cannot compute must instead be refused at construction with one error naming the
storage, the combination and what is accepted. `test_every_storage_class_has_its_rows` fails when an
experts storage lands in moekit without its rows here.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moekit
from moekit.checkpoints import save_tensors
from moekit.config import MoEConfig
from moekit.errors import ConfigError, MoekitError
from moekit.gguf.storage import GGUFExperts
from moekit.infer.offload import OffloadError
from moekit.infer.offload.experts import OffloadedExperts
from moekit.infer.offload.transform import offload_model
from moekit.moe import native
from moekit.moe.experts import Experts, activate, loop_experts
from moekit.moe.layers import MoELayer
from moekit.moe.quant_format import QuantSpec
from moekit.moe.quantized import QuantizedExperts
from moekit.moe.storage import ExpertsStorage
from moekit.moefy.encoder_moe import EncoderMoE
from moekit.parallel.dispatcher import AllToAllDispatcher
from moekit.parallel.transform import _shard_experts
from quant_oracle import fake_quant_rows

pytestmark = pytest.mark.usefixtures("one_thread")

E, D, FF = 8, 64, 128  # the shared shape; K-quant GGUF blocks need 256-wide rows: KE, KD experts of KD x KD
KE, KD = 4, 256
ROWS = {E: {"prefill": [3, 0, 5, 1, 0, 7, 2, 2], "decode": [1, 0, 0, 1, 0, 0, 1, 0], "padded": [3] * E},
        KE: {"prefill": [5, 0, 7, 8], "decode": [1, 0, 1, 0], "padded": [4] * KE}}  # padded: bmm's layout, every expert C rows
ACTIVATIONS = ["swiglu", "gelu", "clamped_swiglu"]
FLOAT_KERNELS = ["loop", "grouped_mm", "bmm", "native", "auto"]
QUANT_KERNELS = ["dequant", "numba", "native", "auto"]
GGUF_KERNELS = ["dequant", "native", "auto"]
SPECS = {"int8": QuantSpec(8), "int4-g32": QuantSpec(4, 32), "int4-g64-zp": QuantSpec(4, 64, symmetric=False),
         "int4-g128": QuantSpec(4, 128)}
GGUF_TYPES = {"Q8_0": ("Q8_0",) * 3, "Q4_0": ("Q4_0",) * 3, "Q5_0": ("Q5_0",) * 3, "Q8_0/Q4_0/Q5_0": ("Q8_0", "Q4_0", "Q5_0"),
              "Q4_K/Q4_K/Q6_K@256": ("Q4_K", "Q4_K", "Q6_K"), "Q5_K/Q6_K/Q4_K@256": ("Q5_K", "Q6_K", "Q4_K"),
              "Q4_K@64": ("Q4_K",) * 3}
TIERS = ["memory", "emulated", "disk", "disk-spill", "cuda-host"]
SLOTS = {"fp32": FLOAT_KERNELS, "int8": QUANT_KERNELS, "int4-g32": QUANT_KERNELS, "Q8_0": GGUF_KERNELS}


@functools.lru_cache(maxsize=None)
def source(activation: str, bias: bool = False, num_experts: int = E, hidden: int = D, width: int = FF) -> Experts:
    """The shared random resident experts (biases random where present); never changed by a case."""
    bias = bias or activation == "clamped_swiglu"
    torch.manual_seed(ACTIVATIONS.index(activation) + 10 * bias + num_experts + hidden)  # fixed: the kernels are deterministic
    src = Experts(num_experts, hidden, width, activation, "loop", bias=bias, swiglu_limit=1.5)
    with torch.no_grad():
        src.w_in_EHD.mul_(2)  # pre-activations of a few units, so the clamp at 1.5 bites
        for b in (src.b_in_EH, src.b_out_ED):
            if b is not None:
                b.normal_(0, 0.5)
    return src.requires_grad_(False)


@dataclass
class Built:
    """A storage made from the source, its effective weights (w_in, w_out, b_in, b_out) and its activation."""

    storage: ExpertsStorage
    weights: tuple
    act: object
    integer: bool = False  # its `native` kernel is the integer-dot one (rounds activations to int8 blocks)
    closers: list = field(default_factory=list)


def weights_of(storage) -> tuple:
    """The effective fp32 weights of a storage, read through its own reference (dequantization)."""
    if isinstance(storage, Experts):
        return tuple(None if t is None else t.detach().float() for t in
                     (storage.w_in_EHD, storage.w_out_EDF, storage.b_in_EH, storage.b_out_ED))
    n = storage.num_experts
    if isinstance(storage, QuantizedExperts):
        w_in = torch.stack([storage.dequantized("w_in_EHD", e) for e in range(n)])
        w_out = torch.stack([storage.dequantized("w_out_EDF", e) for e in range(n)])
        return w_in, w_out, storage.b_in_EH, storage.b_out_ED
    gate, up, down = storage.qtypes  # GGUFExperts: the blocks dequantized by gguf-py, not by moekit
    w_in = (_gguf_py(storage.w_in_EHB, gate) if storage.fused
            else torch.cat((_gguf_py(storage.w_gate_EFB, gate), _gguf_py(storage.w_up_EFB, up)), dim=1))
    return w_in, _gguf_py(storage.w_out_EDB, down), None, None


def _gguf_py(blocks_EOB: torch.Tensor, qtype: str) -> torch.Tensor:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    n, o, _ = blocks_EOB.shape
    return torch.from_numpy(np.array(dequantize(blocks_EOB.reshape(n * o, -1).numpy(), Q[qtype]), dtype=np.float32)).view(n, o, -1)


# ---------------------------------------------------------------- conversions from the source


def resident(activation, kernel, variant=None) -> Built:
    src = source(activation)
    s = Experts(E, D, FF, activation, kernel, bias=src.has_bias, swiglu_limit=1.5).requires_grad_(False)
    s.load_state_dict(src.state_dict())
    return Built(s, weights_of(s), src._act)


def quantized(activation, kernel, variant) -> Built:
    s = QuantizedExperts(source(activation), SPECS[variant], kernel)
    return Built(s, weights_of(s), source(activation)._act, integer=True)


def gguf_blocks(activation, kernel, variant) -> Built:
    types = GGUF_TYPES[variant]
    wide = variant.endswith("@256")
    n, d = (KE, KD) if wide else (E, D)
    f = KD if wide else FF
    s = GGUFExperts.empty(n, d, f, activation, types, kernel)
    src = source(activation, num_experts=n, hidden=d, width=f)
    gate_up = src.w_in_EHD.split(f, dim=1) if activation == "swiglu" else (src.w_in_EHD,)
    blocks = [_blocks(w, q, seed) for seed, (w, q) in enumerate(zip((*gate_up, src.w_out_EDF), (*types[: len(gate_up)], types[2])))]
    with torch.no_grad():
        if s.fused:
            s.w_in_EHB.copy_(torch.cat(blocks[:-1], dim=1))
        else:
            s.w_gate_EFB.copy_(blocks[0])
            s.w_up_EFB.copy_(blocks[1])
        s.w_out_EDB.copy_(blocks[-1])
    return Built(s, weights_of(s), activation, integer=True)


def _blocks(w_EOI: torch.Tensor, qtype: str, seed: int) -> torch.Tensor:
    """w in `qtype` blocks: gguf-py's quantizer of w, or (K types, which gguf-py cannot quantize) random valid blocks."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    n, o, i = w_EOI.shape
    if qtype in ("Q8_0", "Q4_0", "Q5_0"):
        return torch.from_numpy(np.ascontiguousarray(quantize(w_EOI.numpy().reshape(n * o, i), Q[qtype]))).view(n, o, -1)
    rng = np.random.default_rng(seed)
    size = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[qtype]
    b = rng.integers(0, 256, (n * o, i // 256, size), dtype=np.uint8)
    half = lambda: (rng.random(b.shape[:2]) * 0.01 + 1e-3).astype(np.float16).view(np.uint8).reshape(*b.shape[:2], 2)  # noqa: E731
    if qtype == "Q6_K":
        b[..., 208:210] = half()
    else:
        b[..., 0:2], b[..., 2:4] = half(), half()
    return torch.from_numpy(b).view(n, o, -1)


def shard(activation, kernel, variant) -> Built:
    """An expert-parallel shard (EP size 2): the transform's slice of every stacked tensor of the storage."""
    rank = int(variant[-1])
    built = quantized(activation, kernel, "int8") if variant.startswith("int8") else resident(activation, kernel)
    dispatcher = AllToAllDispatcher(SimpleNamespace(ep_size=2, ep_rank=rank), E)
    _shard_experts(built.storage, dispatcher)
    lo, hi = rank * E // 2, (rank + 1) * E // 2
    built.weights = tuple(None if t is None else t[lo:hi] for t in built.weights)
    return built


def encoder(activation, kernel, variant=None) -> Built:
    """moefy's encoder experts (GELU with input biases; the dense output bias is the layer's, added once)."""
    src = source("gelu", bias=True)
    moe = EncoderMoE(D, E, 2, FF, 0, "topk")
    s = moe.experts
    s.kernel = kernel
    with torch.no_grad():
        for name in ("w_in_EHD", "w_out_EDF", "b_in_EH"):
            getattr(s, name).copy_(getattr(src, name))
    return Built(s, (src.w_in_EHD, src.w_out_EDF, src.b_in_EH, torch.zeros(E, D)), "gelu")


class _Model(nn.Module):
    def __init__(self, layer: MoELayer):
        super().__init__()
        self.moe = layer


def offloaded(activation, kernel, variant, tmp_path=None) -> Built:
    """The layer's experts (fp32, int8, int4 or GGUF slots) offloaded to `tier` with half of them in fast slots."""
    slots, tier = variant.split("@")
    inner = {"fp32": resident, "Q8_0": gguf_blocks}.get(slots, quantized)(activation, kernel, slots)
    cfg = MoEConfig(hidden_size=D, num_experts=E, top_k=2, expert_hidden=FF, activation=activation,
                    expert_biases=activation == "clamped_swiglu", kernel="loop")
    torch.manual_seed(0)
    model = _Model(MoELayer(cfg)).eval()
    model.moe.experts = inner.storage
    options = {"tier": tier}
    if tier == "emulated":
        options["link_bandwidth"] = "1000GB/s"
    if tier.startswith("disk"):
        options = {"tier": "disk", "checkpoint": tmp_path / "model.safetensors", "spill_dir": tmp_path}
        state = model.state_dict()
        if tier == "disk-spill":  # the checkpoint holds the experts in fp32, the model quantized them: a spill file
            state = {k: v for k, v in state.items() if not k.startswith("moe.experts.")}
            state.update({f"moe.experts.{k}": v for k, v in source(activation).state_dict().items()})
        save_tensors(options["checkpoint"], {k: v.contiguous() for k, v in state.items()})
    offloader = offload_model(model, "50%", **options)
    inner.storage, inner.closers = model.moe.experts, [offloader.close]
    return inner


BUILDERS = {"resident": resident, "shard": shard, "encoder": encoder, "quantized": quantized, "gguf": gguf_blocks,
            "offloaded": offloaded}
CLASSES = {"resident": Experts, "shard": Experts, "encoder": Experts, "quantized": QuantizedExperts, "gguf": GGUFExperts,
           "offloaded": OffloadedExperts}


def _cases():
    """(storage, variant, activation, kernel) for every combination, refused ones included."""
    out = [("resident", "-", a, k) for a in ACTIVATIONS for k in FLOAT_KERNELS]
    out += [("shard", f"ep2-rank{r}", a, k) for r in (0, 1) for a in ACTIVATIONS for k in FLOAT_KERNELS]
    out += [("shard", "int8-ep2-rank1", a, k) for a in ACTIVATIONS for k in QUANT_KERNELS]
    out += [("encoder", "-", "gelu+bias", k) for k in FLOAT_KERNELS]
    out += [("quantized", v, a, k) for v in SPECS for a in ACTIVATIONS for k in QUANT_KERNELS]
    out += [("gguf", v, a, k) for v in GGUF_TYPES for a in ACTIVATIONS for k in GGUF_KERNELS]
    # (GGUF slots read a GGUF file on disk: tests/test_offload_quant.py's lazy GGUF runs; here memory and the link)
    out += [("offloaded", f"{s}@{t}", a, k) for s, kernels in SLOTS.items() for t in TIERS for a in ACTIVATIONS
            for k in (kernels if t == "memory" else ["auto"]) if not (s == "Q8_0" and t.startswith("disk"))]
    return out


CASES = _cases()


def refusal(kind: str, variant: str, activation: str):
    """(error class, message pattern) for a combination its storage refuses at construction, else None."""
    if kind == "quantized" and variant == "int4-g128":
        return ConfigError, r"^QuantizedExperts: int4-g128: group_size=128 does not divide the input width 64 .*group sizes that divide it"
    if (kind == "gguf" or variant.startswith("Q8_0@")) and activation == "clamped_swiglu":  # (built before offloading)
        return ConfigError, (r"^GGUFExperts: experts with activation='clamped_swiglu' cannot run from GGUF blocks: accepted "
                             r"activations are swiglu, gelu")
    if kind == "gguf" and variant == "Q4_K@64":
        return ConfigError, r"^GGUFExperts: w_in has 64 columns, which do not split into Q4_K's 256-weight blocks: accepted widths"
    if kind == "offloaded" and activation == "clamped_swiglu":
        return ConfigError, r"^OffloadedExperts: the experts of MoE layer 'moe' carry biases.*accepted: experts without biases"
    if kind == "offloaded" and variant.endswith("@cuda-host"):
        return OffloadError, r"tier 'cuda-host' needs a model on a CUDA device; on CPU use 'disk' or 'emulated'"
    return None


RUNS = [c for c in CASES if refusal(*c[:3]) is None]
REFUSED = [c for c in CASES if refusal(*c[:3]) is not None]


def _id(case) -> str:
    return "-".join(case)


def oracle(x, rows_E, weights, act, rounded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loop on the effective weights, rows whose rounding is ambiguous). rounded: each matmul's input rounded to int8
    blocks, as the integer-dot kernels do; a row holding a value within float error of a rounding boundary may
    then differ from the kernel's by one code (the kernel's activation is not bit-equal to torch's)."""
    w_in, w_out, b_in, b_out = weights
    if not rounded:
        return loop_experts(x, rows_E, w_in, w_out, act, b_in, b_out), torch.zeros(x.shape[0], dtype=torch.bool)
    out, ambiguous, start = [], [], 0
    for e, count in enumerate(rows_E.tolist()):
        if count:
            xs = x[start : start + count]
            h = F.linear(fake_quant_rows(xs), w_in[e], None if b_in is None else b_in[e])
            a = activate(h, act)
            out.append(F.linear(fake_quant_rows(a), w_out[e], None if b_out is None else b_out[e]))
            ambiguous.append(_near_a_boundary(xs) | _near_a_boundary(a))
        start += count
    return torch.cat(out), torch.cat(ambiguous)


def _near_a_boundary(v: torch.Tensor) -> torch.Tensor:
    """Per row: some value's int8 code (per 32-value block, scale absmax / 127) lies within 2e-4 of a .5 tie (float error of t)."""
    vb = v.float().reshape(v.shape[0], -1, 32)
    t = vb * (127.0 / vb.abs().amax(-1, keepdim=True).clamp_min(1e-30))
    return ((t - t.floor() - 0.5).abs() < 2e-4).flatten(1).any(1)


def assert_equals_oracle(got, want, ambiguous) -> None:
    """test_native.py's tolerance; rows of ambiguous rounding (few) within a few int8 codes' worth (5e-3 of the scale)."""
    scale = float(want.abs().max())
    torch.testing.assert_close(got[~ambiguous], want[~ambiguous], atol=2e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(got[ambiguous], want[ambiguous], atol=5e-3 * scale, rtol=1e-4)


def check_storage(built: Built, rows: str, activation: str) -> None:
    s = built.storage
    w_in, w_out = built.weights[:2]
    n, h, d = w_in.shape
    assert isinstance(s, ExpertsStorage)
    assert s.shape_EHDF == (n, h, d, w_out.shape[2]) and s.num_experts == n
    assert s.num_weights == w_in.numel() + w_out.numel()
    assert s.activation == activation.split("+")[0] and s.has_bias == (built.weights[2] is not None)
    assert s.kernel in s.kernels
    rows_E = torch.tensor(ROWS[n][rows])
    x = torch.randn(int(rows_E.sum()), d, generator=torch.Generator().manual_seed(len(rows)))
    with torch.no_grad():
        ran = s.kernel_for(x, rows_E)  # the two calls a dispatcher makes
        assert ran in s.kernels and ran != "auto"
        got = s(x, rows_E, kernel=ran)
    want, ambiguous = oracle(x, rows_E, built.weights, built.act, rounded=built.integer and ran == "native")
    assert got.shape == (x.shape[0], d) and got.dtype == x.dtype
    assert_equals_oracle(got, want, ambiguous)


@pytest.mark.parametrize("rows", ["prefill", "decode", "padded"])
@pytest.mark.parametrize("case", RUNS, ids=_id)
def test_storage_equals_loop_on_its_effective_weights(case, rows, tmp_path):
    kind, variant, activation, kernel = case
    build = BUILDERS[kind]
    built = build(activation, kernel, variant, tmp_path) if kind == "offloaded" else build(activation.split("+")[0], kernel, variant)
    try:
        check_storage(built, rows, activation)
    finally:
        for close in built.closers:
            close()


@pytest.mark.parametrize("case", REFUSED, ids=_id)
def test_storage_refuses_the_combination_at_construction(case, tmp_path):
    kind, variant, activation, kernel = case
    error, pattern = refusal(kind, variant, activation)
    with pytest.raises(error, match=pattern) as info:
        if kind == "offloaded":
            offloaded(activation, kernel, variant, tmp_path)
        else:
            BUILDERS[kind](activation, kernel, variant)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kernel", ["grouped_mm", "bmm", "auto"])
@pytest.mark.parametrize("kind, variant, activation", [("resident", "-", a) for a in ACTIVATIONS]
                         + [("shard", "ep2-rank1", "clamped_swiglu"), ("encoder", "-", "gelu+bias")])
def test_trainable_storage_gradients_equal_loop(kind, variant, activation, kernel):
    """The storages that train: output, input gradient and every parameter's gradient equal `loop`'s under autograd."""
    s = BUILDERS[kind](activation.split("+")[0], kernel, variant).storage.requires_grad_(True)
    rows_E = torch.tensor(ROWS[s.num_experts]["prefill"])
    x = torch.randn(int(rows_E.sum()), D, generator=torch.Generator().manual_seed(6))

    def run(name):
        s.zero_grad()
        xg = x.clone().requires_grad_(True)
        y = s(xg, rows_E, kernel=name)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return [y.detach(), xg.grad] + [p.grad.clone() for p in s.parameters()]

    got, want = run(s.kernel_for(x.clone().requires_grad_(), rows_E)), run("loop")  # (the training-time choice)
    assert len(got) == 2 + len(list(s.parameters())) and all(g is not None for g in got)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- storages that wrap others: the fallback, EP at world 1


FALLBACK_CASES = [("fp32", a, k) for a in ("swiglu", "gelu") for k in FLOAT_KERNELS] + [
    (slots, a, k) for slots in ("int8", "Q8_0") for a in ("swiglu", "gelu") for k in SLOTS[slots]]


@pytest.mark.parametrize("slots, activation, kernel", FALLBACK_CASES, ids="-".join)
def test_low_bit_fallback_computes_misses_from_its_int4_copy_then_hits_from_its_slots(slots, activation, kernel):
    """A miss is computed from the resident int4 (group 32) copy, equal to loop on that copy's dequantized weights
    (int8-rounded where the copy runs native); once the full copies are in, loop on the slots' effective weights."""
    built = {"fp32": resident, "Q8_0": gguf_blocks}.get(slots, quantized)(activation, kernel, slots)
    model = _Model(MoELayer(MoEConfig(hidden_size=D, num_experts=E, top_k=2, expert_hidden=FF, activation=activation))).eval()
    model.moe.experts = built.storage
    offloader = offload_model(model, "100%", tier="memory", low_bit_fallback=True)
    try:
        s, int4 = model.moe.experts, offloader.fallback[0]
        assert isinstance(int4, ExpertsStorage) and int4.activation == activation
        effective = Experts(E, D, FF, activation)  # the slots' effective weights, quantized to int4 directly
        with torch.no_grad():
            effective.w_in_EHD.copy_(built.weights[0])
            effective.w_out_EDF.copy_(built.weights[1])
        by_hand = weights_of(QuantizedExperts(effective, QuantSpec(4, 32)))
        assert all(torch.equal(a, b) for a, b in zip(weights_of(int4)[:2], by_hand[:2]))
        rows_E = torch.tensor(ROWS[E]["prefill"])
        x = torch.randn(int(rows_E.sum()), D, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            first = s(x, rows_E, kernel=s.kernel_for(x, rows_E))
            assert_equals_oracle(first, *oracle(x, rows_E, weights_of(int4), built.act, int4.kernel_for(x, rows_E) == "native"))
            assert offloader.stats()["fallbacks"] == int((rows_E > 0).sum())
            offloader.drain()
            ran = s.kernel_for(x, rows_E)
            second = s(x, rows_E, kernel=ran)
        assert_equals_oracle(second, *oracle(x, rows_E, built.weights, built.act, built.integer and ran == "native"))
        assert offloader.stats()["fallbacks"] == int((rows_E > 0).sum())  # no new misses: all hits
    finally:
        offloader.close()


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_expert_parallel_world_of_one_gives_the_loop_layer(activation, tmp_path):
    """apply_expert_parallel in a real gloo world of one process: the all-to-all dispatcher and the experts it
    leaves (the same storage) give the MoE layer's output with `loop` and the local dispatcher."""
    import torch.distributed as dist

    from moekit.parallel import apply_expert_parallel, init_expert_parallel

    cfg = MoEConfig(hidden_size=D, num_experts=E, top_k=2, expert_hidden=FF, activation=activation,
                    expert_biases=activation == "clamped_swiglu", kernel="loop")
    torch.manual_seed(1)
    model = _Model(MoELayer(cfg)).eval()
    model.moe.experts.load_state_dict(source(activation).state_dict(), strict=False)
    x = torch.randn(2, 10, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, _ = model.moe(x)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        parallel = init_expert_parallel(1)
        apply_expert_parallel(model, parallel)
        assert isinstance(model.moe.dispatcher, AllToAllDispatcher) and isinstance(model.moe.experts, Experts)
        for kernel in FLOAT_KERNELS:
            model.moe.experts.kernel = kernel
            with torch.no_grad():
                got, _ = model.moe(x)
            torch.testing.assert_close(got, want, atol=2e-5 * float(want.abs().max()), rtol=1e-4)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- moefy's encoder experts behind the interface


@pytest.mark.parametrize("router", ["topk", "selector"])
def test_encoder_moe_is_the_hand_computed_sum_of_its_experts(router):
    """Per token: the dense output bias once + the shared slice + each chosen expert's GELU MLP (with its input
    biases) times its routing weight, written out token by token."""
    torch.manual_seed(3)
    moe = EncoderMoE(D, E, 2, FF, 16, router).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        got = moe(x)
        x_TD = x.reshape(-1, D)
        routing = moe.router(x_TD, batch_size=1)
        ex = moe.experts
        want = moe.b_out_D + moe.shared_out(F.gelu(moe.shared_in(x_TD)))
        for t, e, w in zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist(), routing.weight_N.tolist()):
            h = F.gelu(x_TD[t] @ ex.w_in_EHD[e].T + ex.b_in_EH[e])
            want[t] += w * (h @ ex.w_out_EDF[e].T)
    torch.testing.assert_close(got.reshape(-1, D), want, atol=1e-5, rtol=1e-5)
    assert isinstance(ex, ExpertsStorage) and ex.has_bias and not any(n.endswith("b_out_ED") for n in moe.state_dict())


def test_encoder_moe_loads_state_saved_under_the_old_names():
    """moefy outputs written before the experts moved into `Experts` (w_in_EWD, b_in_EW, w_out_EDW) still load."""
    torch.manual_seed(4)
    moe = EncoderMoE(D, E, 2, FF, 0, "topk").eval()
    old = {k.replace("experts.w_in_EHD", "w_in_EWD").replace("experts.b_in_EH", "b_in_EW").replace("experts.w_out_EDF", "w_out_EDW"): v
           for k, v in moe.state_dict().items()}
    assert "w_in_EWD" in old and "b_in_EW" in old and "w_out_EDW" in old
    fresh = EncoderMoE(D, E, 2, FF, 0, "topk").eval()
    fresh.load_state_dict(old, strict=True)
    x = torch.randn(7, D)
    with torch.no_grad():
        assert torch.equal(fresh(x), moe(x))


# ---------------------------------------------------------------- refusals by name, and the registry


@pytest.mark.parametrize("make, message", [
    (lambda: Experts(E, D, FF, kernel="nope"),
     "Experts: kernel='nope' is unknown: accepted values are auto, loop, grouped_mm, bmm, native"),
    (lambda: Experts(E, D, FF, activation="relu"),
     "Experts: activation='relu' is unknown: accepted values are swiglu, gelu, clamped_swiglu"),
    (lambda: Experts(E, D, FF, activation="clamped_swiglu"),
     "Experts: experts with activation='clamped_swiglu' (GPT-OSS) carry biases and their clamp limit: accepted with bias=True "
     "only (GPT-OSS experts cannot be offloaded yet: offloading moves no biases)"),
    (lambda: QuantizedExperts(source("swiglu"), QuantSpec(8), "bmm"),
     "QuantizedExperts: kernel='bmm' is unknown for quantized weights: accepted values are auto, dequant, numba, native"),
    (lambda: GGUFExperts(E, D, FF, ("Q8_0",) * 3, kernel="numba"),
     "GGUFExperts: kernel='numba' is unknown for GGUF block weights: accepted values are auto, native, dequant"),
    (lambda: GGUFExperts(E, D, FF, ("Q8_0", "Q4_1", "Q8_0")),
     "GGUFExperts: the experts' up weights: GGUF type 'Q4_1' has no block path; moekit runs Q8_0, Q4_0, Q5_0, Q4_K, Q6_K, Q5_K as blocks"),
])
def test_a_refused_combination_is_one_config_error_naming_the_storage_and_what_is_accepted(make, message):
    with pytest.raises(ConfigError) as info:
        make()
    assert str(info.value) == message


def _storage_classes() -> list[type]:
    out, todo = [], list(ExpertsStorage.__subclasses__())
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def test_every_storage_class_has_its_rows():
    """Every ExpertsStorage in moekit is a row of this suite; every module answering the experts call
    (`kernel_for`) is an ExpertsStorage. A new storage cannot land without its conformance rows."""
    for info in pkgutil.walk_packages(moekit.__path__, "moekit."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    covered = {CLASSES[kind] for kind, *_ in RUNS}
    missing = [c.__qualname__ for c in _storage_classes() if c not in covered]
    assert not missing, f"experts storages without rows in this suite: {missing}"
    loose = [f"{m.__name__}.{c.__qualname__}" for m in list(sys.modules.values())
             if (m.__name__ or "").startswith("moekit") for _, c in inspect.getmembers(m, inspect.isclass)
             if c.__module__ == m.__name__ and issubclass(c, nn.Module) and hasattr(c, "kernel_for")
             and not issubclass(c, ExpertsStorage)]
    assert not loose, f"modules that answer the experts call without being an ExpertsStorage: {loose}"


# ---------------------------------------------------------------- the GGUF file tier


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A one-layer DecoderLM (E=8 SwiGLU experts of D x FF) written as a Q8_0 GGUF file."""
    import moekit.gguf as G
    from moekit.data.text import Tokenizer
    from moekit.models.decoder import DecoderLM, ModelConfig

    torch.manual_seed(8)
    cfg = ModelConfig(vocab_size=128, hidden_size=D, num_layers=1, num_heads=4, num_kv_heads=2, max_seq_len=64, dense_hidden=64,
                      moe=MoEConfig(num_experts=E, top_k=2, expert_hidden=FF, norm_topk_prob=True))
    return G.save(DecoderLM(cfg).eval(), tmp_path_factory.mktemp("conformance") / "m.gguf", Tokenizer.byte_level(), dtype="Q8_0")


@pytest.mark.parametrize("kernel", ["auto", "dequant", "native", "loop", "bmm"])
@pytest.mark.parametrize("rows", ["prefill", "decode"])
def test_slots_read_from_a_gguf_file_equal_loop(gguf_file, rows, kernel):
    """Offloaded to the GGUF file tier: Q8_0 block slots (loaded in blocks), or fp32 slots (loaded dequantized) read
    through gguf's dequantization; loop on the file's experts as the resident model holds them."""
    import moekit.gguf as G

    blocks = kernel in GGUF_KERNELS
    model = G.load(gguf_file, blocks=blocks)
    experts = model.layers[0].mlp.experts
    assert isinstance(experts, GGUFExperts if blocks else Experts)
    built = Built(experts, weights_of(experts), "swiglu", integer=blocks)
    experts.kernel = kernel
    offloader = offload_model(model, "50%", tier="disk", checkpoint=gguf_file)
    try:
        assert offloader.tier.kind == "gguf"
        built.storage = model.layers[0].mlp.experts
        check_storage(built, rows, "swiglu")
    finally:
        offloader.close()
