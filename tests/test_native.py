"""The compiled integer-dot kernels (moekit.moe.native / _qdot.c) against independent references.

Oracle: the weights dequantized by their own reference (moekit's quant_format.dequantize, gguf-py's
gguf.quants.dequantize for GGUF blocks), the activations rounded per 32-value block to int8 as
tests/quant_oracle.py writes it, then an fp32 matmul. Every instruction-set build this CPU runs is
checked, the portable one ("generic") forced; all builds compute the same integer sums, so they agree
with each other to fp32 rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moekit.moe import native
from moekit.moe.quant_format import QuantSpec, dequantize, quantize
from quant_oracle import fake_quant_rows

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason="the C extension moekit.moe._qdot is not built here")

ISAS = ["generic", "avx2", "avxvnni", "avx512vnni"]
SPECS = [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 64, symmetric=False), QuantSpec(4, 128)]
GROUPS = np.array([[2, 0, 2], [0, 2, 5], [1, 8, 1]])  # (expert, first row, rows): 5 rows = 4 together + 1; row 7 in none
E, O, N = 3, 37, 9


def _isa(name):
    if name not in native.supported_isas():
        pytest.skip(f"this CPU cannot run the {name} kernels")
    return native.force_isa(name)


def _reference(x, W_EOI):
    y = torch.zeros(x.shape[0], W_EOI.shape[1])
    for e, start, count in GROUPS:
        y[start : start + count] = fake_quant_rows(x[start : start + count]) @ W_EOI[e].T
    return y


def _close(got, want):
    torch.testing.assert_close(got, want, atol=2e-5 * float(want.abs().max()), rtol=1e-4)


def _random_k_blocks(qtype, rows, width, rng):
    """Random but valid Q4_K / Q6_K super-blocks (gguf-py cannot quantize to them): any codes, small finite scales."""
    size = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[qtype]
    b = rng.integers(0, 256, (rows, width // 256, size), dtype=np.uint8)
    half = lambda: (rng.random(b.shape[:2]) * 0.01 + 1e-3).astype(np.float16).view(np.uint8).reshape(*b.shape[:2], 2)  # noqa: E731
    if qtype in ("Q4_K", "Q5_K"):
        b[..., 0:2], b[..., 2:4] = half(), half()
    else:
        b[..., 208:210] = half()
    return b.reshape(rows, -1)


def _gguf_weight(qtype, I, rng):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize
    from gguf.quants import quantize as gguf_quantize

    kind = GGMLQuantizationType[qtype]
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        blocks = _random_k_blocks(qtype, E * O, I, rng).reshape(E, O, -1)
    else:
        blocks = gguf_quantize(rng.standard_normal((E, O, I)).astype(np.float32), kind)
    W = torch.from_numpy(np.array(gguf_dequantize(blocks, kind), dtype=np.float32).reshape(E, O, I))
    return torch.from_numpy(np.ascontiguousarray(blocks)), W


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_moekit_formats_equal_the_dequantized_reference(isa, spec):
    torch.manual_seed(0)
    I = 256
    parts = quantize(torch.randn(E, O, I), spec)
    x = torch.randn(N, I) * torch.linspace(0.1, 3, I)  # blocks of very different scales
    with _isa(isa):
        got = native.matmul(x, native.moekit_weight(parts["q"], parts["scale"], parts.get("zero"), spec), GROUPS)
    _close(got, _reference(x, dequantize(parts, spec)))
    assert (got[7] == 0).all()  # a row in no group is left zero


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", native.GGUF_TYPES)
def test_gguf_block_formats_equal_gguf_py_dequantize(isa, qtype):
    rng = np.random.default_rng(1)
    blocks, W = _gguf_weight(qtype, 512, rng)
    x = torch.from_numpy(rng.standard_normal((N, 512)).astype(np.float32))
    with _isa(isa):
        got = native.gguf_matmul(x, blocks, qtype, GROUPS)
    _close(got, _reference(x, W))


@pytest.mark.parametrize("qtype", ["int8", "int4-g32", "Q4_K", "Q5_K", "Q6_K"])
def test_every_instruction_set_gives_the_forced_portable_result(qtype):
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((N, 512)).astype(np.float32))
    if qtype.startswith("int"):
        spec = QuantSpec(8) if qtype == "int8" else QuantSpec(4, 32)
        p = quantize(torch.from_numpy(rng.standard_normal((E, O, 512)).astype(np.float32)), spec)
        run = lambda: native.matmul(x, native.moekit_weight(p["q"], p["scale"], p.get("zero"), spec), GROUPS)  # noqa: E731
    else:
        blocks, _ = _gguf_weight(qtype, 512, rng)
        run = lambda: native.gguf_matmul(x, blocks, qtype, GROUPS)  # noqa: E731
    with native.force_isa("generic"):
        portable = run()
    for name in native.supported_isas():
        with native.force_isa(name):
            torch.testing.assert_close(run(), portable, atol=1e-5 * float(portable.abs().max()), rtol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, 32)], ids=lambda s: s.name)
def test_one_fused_call_runs_a_layers_experts(activation, spec):
    torch.manual_seed(3)
    D, F_ = 64, 96
    H = 2 * F_ if activation == "swiglu" else F_
    p_in, p_out = quantize(torch.randn(E, H, D), spec), quantize(torch.randn(E, D, F_) / 8, spec)
    x = torch.randn(N, D)
    got = native.moe(x, native.moekit_weight(p_in["q"], p_in["scale"], p_in.get("zero"), spec),
                     native.moekit_weight(p_out["q"], p_out["scale"], p_out.get("zero"), spec), GROUPS, activation)
    W_in, W_out = dequantize(p_in, spec), dequantize(p_out, spec)
    want = torch.zeros(N, D)
    for e, start, count in GROUPS:
        h = fake_quant_rows(x[start : start + count]) @ W_in[e].T
        a = F.silu(h[:, :F_]) * h[:, F_:] if activation == "swiglu" else F.gelu(h)
        want[start : start + count] = fake_quant_rows(a) @ W_out[e].T
    _close(got, want)


def test_two_threads_give_the_one_thread_result_exactly():
    torch.manual_seed(4)
    spec = QuantSpec(4, 32)
    p = quantize(torch.randn(E, 512, 256), spec)
    w = native.moekit_weight(p["q"], p["scale"], p.get("zero"), spec)
    x = torch.randn(N, 256)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.matmul(x, w, GROUPS)
        torch.set_num_threads(2)
        for _ in range(40):  # the adaptive count tries 1 and 2 threads across these calls
            assert torch.equal(native.matmul(x, w, GROUPS), one)
    finally:
        torch.set_num_threads(old)


def test_quantized_modules_run_native_and_equal_the_reference():
    from moekit.moe.experts import Experts
    from moekit.moe.quantized import QuantizedExperts, QuantizedLinear

    if native.isa() in ("none", "generic"):
        pytest.skip("auto picks native only where a vector build runs")
    torch.manual_seed(5)
    spec = QuantSpec(8)
    experts = Experts(4, 64, 96, activation="swiglu", kernel="loop")
    qe = QuantizedExperts(experts, spec)
    x, rows = torch.randn(7, 64), torch.tensor([2, 0, 5, 0])
    assert qe.kernel_for(x, rows) == "native"
    with torch.no_grad():
        torch.testing.assert_close(qe(x, rows), _experts_reference(qe, x), atol=1e-4, rtol=1e-4)
    lin = QuantizedLinear(nn.Linear(64, 48), spec)
    with torch.no_grad():
        ref = F.linear(fake_quant_rows(x), dequantize({"q": lin.weight_q, "scale": lin.weight_scale}, spec)[0], lin.bias)
        torch.testing.assert_close(lin(x), ref, atol=1e-4, rtol=1e-4)


def _experts_reference(qe, x):
    """Experts 0 (rows 0-1) and 2 (rows 2-6), dequantized, with the kernel's roundings of both matmuls' inputs."""
    out = []
    for e, rows in ((0, x[:2]), (2, x[2:])):  # expert 2's 5 rows: four share each decoded block, then one
        h = F.linear(fake_quant_rows(rows), qe.dequantized("w_in_EHD", e))
        out.append(F.linear(fake_quant_rows(F.silu(h[:, :96]) * h[:, 96:]), qe.dequantized("w_out_EDF", e)))
    return torch.cat(out)


def test_a_cpu_without_the_features_falls_back_and_says_so():
    unsupported = [name for name in ISAS if name not in native.supported_isas()]
    for name in unsupported:  # (on this CPU: none; the message is still checked where one is missing)
        with pytest.raises(ValueError, match=f"this CPU cannot run the {name} kernels"):
            native.force_isa(name).__enter__()
    with pytest.raises(ValueError, match="unknown instruction set sse9"):
        native.force_isa("sse9").__enter__()
    code = ("from moekit.moe import native, quantized; from moekit.moe.quant_format import QuantSpec; import torch;"
            "print(native.isa(), quantized.resolve_kernel('auto', 1, QuantSpec(8), (64,), torch.device('cpu')))")
    env = {**os.environ, "MOEKIT_ISA": "generic"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["generic", "numba"]  # the portable build runs, and auto prefers numba's kernels to it
    with native.off():
        assert native.isa() == "none" and not native.supports("Q8_0")


def test_widths_the_kernels_cannot_run_are_refused_or_passed_by():
    from moekit.moe.quantized import resolve_kernel

    assert resolve_kernel("native", 1, QuantSpec(8), (100,), torch.device("cpu")) == "numba"  # not whole 32-blocks
    blocks = torch.zeros(1, 4, 34 * 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="Q8_0 rows of 64 values take 68 bytes, not 102"):
        native.gguf_matmul(torch.zeros(1, 64), blocks, "Q8_0", [(0, 0, 1)])


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fp32_experts_native_path_equals_loop(activation):
    from moekit.moe.experts import Experts

    if native.isa() in ("none", "generic"):
        pytest.skip("auto picks native only where a vector build runs")
    torch.manual_seed(6)
    experts = Experts(4, 64, 80, activation=activation, kernel="loop")
    x, rows = torch.randn(3, 64), torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        assert experts.kernel_for(x, rows, kernel="auto") == "native"  # decoding: one row per active expert
        want = experts(x, rows, kernel="loop")
        got = experts(x, rows, kernel="native")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # fp32 throughout: only the summation order differs
    assert experts.kernel_for(x.requires_grad_(), rows, kernel="native") == "loop"  # training: no backward here
    biased = Experts(4, 64, 80, activation="swiglu", kernel="loop", bias=True)
    with torch.no_grad():
        assert biased.kernel_for(x.detach(), rows, kernel="native") == "loop"  # biases: not this kernel's


@pytest.mark.parametrize("kernel", ["dequant", "numba", "native"])
def test_quantized_gpt_oss_experts_keep_their_biases_and_clamped_activation(kernel):
    """GPT-OSS experts (clamped SwiGLU with biases) quantized: every kernel equals the dequantized fp32 experts."""
    from moekit.moe import quant_kernels
    from moekit.moe.experts import Experts, loop_experts
    from moekit.moe.quantized import QuantizedExperts

    if kernel == "numba" and not quant_kernels.AVAILABLE:
        pytest.skip("numba is not installed")
    torch.manual_seed(7)
    experts = Experts(4, 64, 32, activation="clamped_swiglu", bias=True, kernel="loop")
    with torch.no_grad():
        experts.b_in_EH.normal_()
        experts.b_out_ED.normal_()
    spec = QuantSpec(8)
    qe = QuantizedExperts(experts, spec, kernel=kernel)
    x, rows = torch.randn(5, 64), torch.tensor([2, 0, 3, 0])
    w_in = torch.stack([qe.dequantized("w_in_EHD", e) for e in range(4)])
    w_out = torch.stack([qe.dequantized("w_out_EDF", e) for e in range(4)])
    with torch.no_grad():
        got = qe(x, rows)
        if kernel == "native":  # the native matmuls round their inputs to int8 blocks; biases and activation in fp32
            want = torch.cat([F.linear(fake_quant_rows(experts._act(F.linear(fake_quant_rows(xs), w_in[e], experts.b_in_EH[e]))),
                                       w_out[e], experts.b_out_ED[e]) for e, xs in ((0, x[:2]), (2, x[2:]))])
        else:
            want = loop_experts(x, rows, w_in, w_out, experts._act, experts.b_in_EH, experts.b_out_ED)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (got - loop_experts(x, rows, w_in, w_out, "swiglu")).abs().max() > 1e-2  # biases and the clamp matter here
