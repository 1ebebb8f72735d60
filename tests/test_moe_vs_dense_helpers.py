"""The analytic FLOP count and crossing interpolation of benchmarks/moe_vs_dense.py, checked by hand."""

import importlib.util
import sys
from pathlib import Path

import pytest

from moekit.config import MoEConfig
from moekit.models.decoder import DecoderLM, ModelConfig, count_parameters

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "moe_vs_dense.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("moe_vs_dense", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def tiny(ffn: str) -> ModelConfig:
    # D=8, V=10, 2 layers, 2 query heads + 1 KV head of dim 4; dense width 16 = top-2 x expert width 8
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=8)
    return ModelConfig(vocab_size=10, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1,
                       max_seq_len=16, ffn=ffn, dense_hidden=16, moe=moe)


def test_active_matmul_params_by_hand(bench):
    # per layer attention: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192; lm_head 8*10 = 80
    # dense FFN: 3 * 8 * 16 = 384            -> 80 + 2 * (192 + 384) = 1232
    # MoE FFN: router 8*4 + 2 * 3 * 8 * 8 = 416 -> 80 + 2 * (192 + 416) = 1296
    assert bench.active_matmul_params(tiny("dense")) == 1232
    assert bench.active_matmul_params(tiny("moe")) == 1296


def test_training_flops_per_token_by_hand(bench):
    # attention term 6 * layers 2 * seq 6 * d_attn (2 heads x 4) = 576
    assert bench.attention_flops_per_token(tiny("dense"), 6) == 576
    assert bench.training_flops_per_token(tiny("dense"), 6) == 6 * 1232 + 576
    assert bench.training_flops_per_token(tiny("moe"), 6) == 6 * 1296 + 576


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_matmul_params_agree_with_count_parameters(bench, ffn):
    cfg = tiny(ffn)
    model = DecoderLM(cfg)
    embedding = cfg.vocab_size * cfg.hidden_size
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    assert bench.active_matmul_params(cfg) == count_parameters(model)["active"] - embedding - norms


def test_benchmark_models_have_equal_active_ffn(bench):
    cfgs = {name: bench.model_config(name, bench.FULL, 257) for name in bench.MODELS}
    dense = bench.active_matmul_params(cfgs["dense"])
    for name, cfg in cfgs.items():
        router = cfg.num_layers * cfg.hidden_size * cfg.moe.num_experts if cfg.ffn == "moe" else 0
        assert bench.active_matmul_params(cfg) - router == dense, name


def test_crossing_flops_interpolates_linearly(bench):
    points = [(0, 5.0), (10, 3.0), (20, 2.0)]
    assert bench.crossing_flops(points, 2.5) == pytest.approx(15.0)
    assert bench.crossing_flops(points, 3.0) == pytest.approx(10.0)
    assert bench.crossing_flops(points, 6.0) == 0
    assert bench.crossing_flops(points, 1.0) is None
