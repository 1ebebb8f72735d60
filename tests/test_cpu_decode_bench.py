"""Pure helpers of benchmarks/cpu_decode.py and memory.py: the weight-read floor's bytes, the targets, the page cache.

Oracles: a transformers Mixtral built from the benchmark's tiny configuration (its real parameter
shapes give the bytes one decode step reads); the gguf package's own block sizes for Q8_0/Q4_0; hand
arithmetic for the memory goals. No llama.cpp and no timing here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _cpu_bench as B  # noqa: E402
import memory as M  # noqa: E402


def test_active_bytes_match_the_weights_a_real_model_reads_per_token():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **B.MODELS["tiny"]))
    cfg = B.MODELS["tiny"]
    k, E = cfg["num_experts_per_tok"], cfg["num_local_experts"]
    matrices, routers = 0, 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed_tokens" in name:
            continue  # norms; the embedding is one row per token
        if "gate.weight" in name and "experts" not in name:
            routers += p.numel()
        elif "experts" in name:
            matrices += p.numel() * k // E  # stacked or per-expert: top-k of E experts are read
        else:
            matrices += p.numel()
    assert B.active_bytes("tiny", "fp32") == pytest.approx(4 * (matrices + routers))
    assert B.active_bytes("tiny", "int4") == pytest.approx((0.5 + 4 / 32) * matrices + 4 * routers)


def test_gguf_block_bytes_are_the_gguf_package_ones():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    for name in ("Q8_0", "Q4_0", "F32"):
        block, size = GGML_QUANT_SIZES[Q[name]]
        assert B.BYTES_PER_WEIGHT[name] == pytest.approx(size / block)


def _cell(q, budget, peak, tok_s=1.0):
    return {"quantize": q, "budget": budget, "memory": {"VmHWM": peak}, "from_page_cache": {"decode_tok_s": tok_s}}


def test_memory_goals_by_hand_and_they_can_fail():
    sizes = {"fp32": {"non_expert_MB": 100.0, "expert_MB": 1000.0, "model_MB": 1100.0},
             "int4": {"non_expert_MB": 100.0, "expert_MB": 156.25, "model_MB": 256.25}}
    cells = [_cell("fp32", "resident", 1610.0), _cell("fp32", "25%", 751.0),
             _cell("int4", "resident", 500.0, tok_s=10.0), _cell("int4", "25%", 500.0, tok_s=7.9)]
    t = {x["name"]: x for x in M.targets_of(cells, sizes)}
    resident = t["peak RSS MB, fp32, budget resident"]
    assert resident["goal"] == pytest.approx(1.1 * 1100 + 400) and resident["met"]  # 1610 <= 1610
    quarter = t["peak RSS MB, fp32, budget 25%"]
    assert quarter["goal"] == pytest.approx(100 + 250 + 400) and not quarter["met"]  # 751 > 750
    speed = t["offloaded int4 25% / resident int4 decode tok/s (page cache)"]
    assert speed["value"] == pytest.approx(0.79) and not speed["met"]


def test_a_refused_cell_is_reported_not_counted():
    sizes = {"int4": {"non_expert_MB": 1.0, "expert_MB": 1.0, "model_MB": 2.0}}
    cells = [{"quantize": "int4", "budget": "25%", "not_run": "ConfigError: not yet"}, _cell("int4", "resident", 1.0)]
    t = {x["name"]: x for x in M.targets_of(cells, sizes)}
    assert "peak RSS MB, int4, budget 25%" not in t
    speed = t["offloaded int4 25% / resident int4 decode tok/s (page cache)"]
    assert speed["value"] is None and not speed["met"] and "not yet" in speed["not_run"]


def test_drop_cache_evicts_a_file_it_just_read(tmp_path):
    f = tmp_path / "weights.bin"
    with open(f, "wb") as fh:
        fh.write(b"\1" * (8 << 20))
        fh.flush()
        os.fsync(fh.fileno())  # clean pages: fadvise cannot drop dirty ones
    M.warm_cache([f])
    before = M.cached_fraction([f])
    if before is None:
        pytest.skip("fincore (util-linux) is not installed")
    assert before > 0.9
    out = M.drop_cache([f], allow_global=False)  # never the whole machine's cache from a test
    assert out["cached_fraction_after"] < 0.5, out
