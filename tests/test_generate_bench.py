"""benchmarks/generate.py helpers: the weight-read floor lists what one decode step reads, the targets can fail.

A tiny DeepSeek-V3-like model (MLA, one dense layer, shared expert) built
from a transformers config; the expected matrices and their shapes are worked
out by hand from that config.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"


def _load():
    spec = importlib.util.spec_from_file_location("generate_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_floor_weights_of_an_mla_model():
    from moekit.hf import model_config_from_hf
    from moekit.models.build import build_model

    D, H, E, K, F, V = 32, 2, 4, 2, 8, 50
    hf = bench.deepseek_v3_like(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=H,
                                num_key_value_heads=H, intermediate_size=24, moe_intermediate_size=F, n_routed_experts=E,
                                num_experts_per_tok=K, n_group=2, topk_group=1, q_lora_rank=12, kv_lora_rank=10,
                                qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)
    model = build_model(model_config_from_hf(hf.to_dict()))
    shapes = sorted(tuple(w.shape) for w in bench.floor_weights(model))
    attention = [(12, D), (H * 10, 12), (10 + 4, D), (H * (6 + 5), 10), (D, H * 5)]  # q_a, q_b, kv_a, kv_b, o
    dense = [(24, D), (24, D), (D, 24)]  # gate, up, down of the first (dense) layer
    shared = [(F, D), (F, D), (D, F)]  # the shared expert's gate, up, down
    moe = [(E, D)] + [(2 * F, D), (D, F)] * K + shared  # router, top-k experts (gate+up stacked, down), shared expert
    expected = sorted(attention * 2 + dense + moe + [(V, D)])
    assert shapes == expected


def test_targets_use_each_models_goal_and_can_fail():
    row = {"decode_speedup": 1.6, "prefill_speedup": 0.9, "decode_speedup_spread": {}, "prefill_speedup_spread": {}}
    models = {"mixtral": {"decode_goal": 2.0, "batches": {"1": row}},
              "deepseek_v3": {"decode_goal": 1.5, "batches": {"1": row},
                              "cache_bytes_per_token": {"latent": 10.0, "per_head_kv": 100.0,
                                                        "transformers_dynamic_cache": 8.0}}}
    verdicts = [(t["name"], t["met"]) for t in bench.make_targets(models)]
    assert verdicts == [
        ("decode tokens/s vs transformers, mixtral, batch 1", False),  # 1.6 < 2.0
        ("prefill tokens/s vs transformers, mixtral, batch 1", False),  # 0.9 < 1.0
        ("decode tokens/s vs transformers, deepseek_v3, batch 1", True),  # 1.6 >= 1.5
        ("prefill tokens/s vs transformers, deepseek_v3, batch 1", False),
        ("mla_cache_bytes_per_token_vs_per_head_kv, deepseek_v3", True),  # 0.1 <= 1/8
        ("mla_cache_bytes_per_token_vs_transformers, deepseek_v3", False),  # 10/8 > 1
    ]
