"""PR-MoE as a model: the pyramid knob, the presets, and `moekit inspect`'s per-layer parameter table."""

import re

import pytest

from moekit.cli.main import main
from moekit.errors import ConfigError
from moekit.models.decoder import ModelConfig
from moekit.train.lm import resolve_run_config, train_lm

D, HEADS, KV, DENSE, FE = 32, 2, 1, 48, 16
PR_MOE = [f"model.hidden_size={D}", "model.num_layers=3", f"model.num_heads={HEADS}", f"model.num_kv_heads={KV}",
          f"model.dense_hidden={DENSE}", f"moe.expert_hidden={FE}", "model.pyramid=[2,4]", "model.pyramid_layers=[1,2]",
          "model.max_seq_len=64", "train.device=cpu", "train.batch_size=2", "train.seq_len=16", "train.steps=1", "train.warmup_steps=0",
          "train.eval_every=0", "train.eval_batches=1"]


def test_pyramid_gives_experts_per_layer_and_paper_shape():
    cfg = ModelConfig(num_layers=12, pyramid=[32, 64], pyramid_layers=[10, 2], ffn="residual_moe")
    assert cfg.experts_per_layer == [32] * 10 + [64] * 2
    assert [cfg.moe_for_layer(i).num_experts for i in (0, 9, 10, 11)] == [32, 32, 64, 64]
    assert ModelConfig(num_layers=5, pyramid=[4, 8]).experts_per_layer == [4, 4, 8, 8, 8]  # later stage takes the rest
    paper = resolve_run_config("pr-moe-350m").model
    moe_counts = [paper.moe_for_layer(i).num_experts for i in range(paper.num_layers) if paper.is_moe_layer(i)]
    assert moe_counts == [32] * 10 + [64] * 2 and paper.ffn == "residual_moe" and paper.moe.top_k == 1


def test_preset_pr_moe_overrides_rebuild_the_pyramid():
    cfg = resolve_run_config("pr-moe", None, ["model.num_layers=6", "model.pyramid_layers=[4,2]"]).model
    assert cfg.experts_per_layer == [8, 8, 8, 8, 16, 16] and cfg.ffn == "residual_moe"


def test_bad_pyramid_is_one_clear_message():
    with pytest.raises(ConfigError, match=r"model.pyramid=\[2, 4\] with pyramid_layers=\[1\] is invalid"):
        ModelConfig(num_layers=3, pyramid=[2, 4], pyramid_layers=[1])


def hand_count(E: int) -> tuple[int, int]:
    """One Residual-MoE block by hand: attention, 2 norms, router, E SwiGLU experts, dense MLP, coefficient."""
    head_dim = D // HEADS
    attention = D * HEADS * head_dim * 2 + D * KV * head_dim * 2  # q, o; k, v
    expert = 3 * D * FE
    total = attention + 2 * D + D * E + E * expert + 3 * D * DENSE + (2 * D + 2)
    return total, total - (E - 1) * expert  # top-1: one expert active


def test_inspect_shows_per_layer_total_and_active_equal_to_a_hand_count(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(300)))
    run = tmp_path / "run"
    train_lm(resolve_run_config("pr-moe", None, PR_MOE, str(text)), run, progress=False)
    capsys.readouterr()
    assert main(["inspect", str(run), "--batches", "1", "--heatmap", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    rows = {m[0]: (m[1], int(m[2].replace(",", "")), int(m[3].replace(",", "")))
            for m in re.findall(r"^(layer \d+|embeddings|norm \+ head)\s+(?:\S+\s+)?(\d+ \(top-1\)|)\s*([\d,]+)\s+([\d,]+)$",
                                out, re.M)}
    for i, E in enumerate([2, 4, 4]):
        assert rows[f"layer {i}"] == (f"{E} (top-1)", *hand_count(E)), out
    V = 257
    assert rows["embeddings"][1:] == (V * D, V * D) and rows["norm + head"][1:] == (D + D * V, D + D * V)
    total = sum(r[1] for r in rows.values())
    active = sum(r[2] for r in rows.values())
    assert f"parameters: {total:,} total, {active:,} active per token" in out
