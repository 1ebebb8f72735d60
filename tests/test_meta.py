"""Meta-device builds (moekit.meta): the same shapes as real ones, ties kept, and no torch._dynamo/sympy import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from moekit.meta import empty_on, on_meta
from moekit.moe.quant_format import QuantSpec, quantize


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 64, symmetric=False)])
def test_quantizing_on_meta_gives_the_stored_shapes_and_dtypes_of_a_real_quantization(spec):
    w = torch.randn(3, 16, 128)
    real = quantize(w, spec)
    meta = quantize(w.to("meta"), spec)
    assert list(meta) == list(real)
    for name in real:
        assert meta[name].is_meta and meta[name].shape == real[name].shape and meta[name].dtype == real[name].dtype


def test_empty_on_keeps_ties_and_casts_only_floats():
    with on_meta():
        m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    m[1].weight = m[0].weight
    m.register_buffer("ids", torch.zeros(3, dtype=torch.long, device="meta"))
    assert all(p.is_meta for p in m.parameters())
    empty_on(m, "cpu", torch.bfloat16)
    assert m[1].weight is m[0].weight and m[0].weight.dtype == torch.bfloat16 and not m[0].weight.is_meta
    assert m.ids.dtype == torch.long and m.ids.device.type == "cpu"


def test_quantized_and_offloaded_slots_import_neither_dynamo_nor_sympy():
    code = """
import sys
from moekit.moe.quant_format import QuantSpec
from moekit.moe.quantized import QuantizedExperts
from moekit.infer.offload.budget import LayerShape
from moekit.infer.offload.experts import _make_slots
import torch
QuantizedExperts.empty(4, 64, 128, "swiglu", QuantSpec(4, 32), device="cpu")
QuantizedExperts.empty(4, 64, 128, "swiglu", QuantSpec(8), device="meta")
_make_slots(2, LayerShape(4, 256, 64, 128, torch.float32, 2), "swiglu", "cpu")
print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
