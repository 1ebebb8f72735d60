"""benchmarks/_harness.py, the training-comparison harness, and the benchmarks' import graph.

Oracles: fit's own metrics.jsonl and a hand count of tokens and FLOPs (the
curve), hand-written targets, the PNG signature, an AST walk of the benchmark
scripts (no import circle, e.g. deepspeed_moe <-> its report).
"""

import ast
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, str(BENCH))
    import _harness

    yield _harness
    sys.path.remove(str(BENCH))


def test_train_curve_records_fits_evaluations_against_tokens_and_flops(harness, tmp_path):
    from dataclasses import dataclass

    from moekit.config import MoEConfig
    from moekit.models.decoder import DecoderLM, ModelConfig

    @dataclass
    class Scale:
        steps: int = 4
        batch_size: int = 2
        seq_len: int = 8
        warmup: int = 1
        evals: int = 2
        eval_batches: int = 1

    tc = harness.train_config(Scale(), 3e-3, seed=0, device="cpu")
    assert (tc.eval_every, tc.save_every, tc.min_lr_ratio) == (2, 0, 0.1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, max_seq_len=8,
                      dense_hidden=32, moe=MoEConfig(num_experts=2, top_k=1, expert_hidden=32))
    model = DecoderLM(cfg)
    tokens = torch.randint(0, 257, (400,))
    calls = []
    evaluate = lambda m: calls.append(1) or {"val_loss": 5.0 - len(calls), "other": 1.0}  # noqa: E731
    curve, seconds = harness.train_curve(model, tc, train_tokens=tokens, evaluate=evaluate, flops_per_token=10.0,
                                         run_dir=tmp_path / "run")
    assert [(p["step"], p["tokens"], p["flops"], p["val_loss"]) for p in curve] == [
        (0, 0, 0, 4.0), (2, 32, 320.0, 3.0), (4, 64, 640.0, 2.0)]  # 2 x 8 tokens a step, 10 FLOPs a token
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in logged if "val_loss" in r] == [3.0, 2.0] and seconds > 0
    reloaded = harness.load_trained(tmp_path / "run")
    torch.testing.assert_close(reloaded.state_dict(), model.state_dict())


def test_reach_target_and_targets_table(harness):
    met = harness.reach_target("x", 0.4, 0.5, final=1.9, dense_final=2.0, budget_ratio=1.0)
    assert met["met"] and met["value"] == 0.4 and met["direction"] == "<="
    never = harness.reach_target("y", None, 0.5, final=2.1, dense_final=2.0, budget_ratio=1.25)
    assert not never["met"] and never["value"] is None
    assert "final val loss 2.1000 vs dense 2.0000" in never["note"] and "above 1.25" in never["note"]
    table = harness.targets_markdown([met, never])
    assert "| x | 0.4 | <= 0.5 | yes |" in table and "| y | n/a | <= 0.5 | **no** |" in table


def test_plot_curves_writes_one_png(harness, tmp_path):
    panels = [{"title": "a", "series": [("m", [1, 2], [3.0, 2.0], {})], "marks": [(1.5, 2.5)],
               "hlines": [(2.0, {"linestyle": "--"})], "vlines": [(1.0, {})]},
              {"series": [("n", [1, 2], [1.0, 0.5], {"linestyle": ":"})], "ylim": (0, 4)}]
    path = harness.plot_curves(panels, tmp_path / "curves.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp.png"))


def test_save_and_load_runs(harness, tmp_path):
    harness.save_json(tmp_path / "runs" / "b.json", {"name": "b"})
    harness.save_json(tmp_path / "runs" / "a.json", {"name": "a"})
    assert harness.load_runs(tmp_path / "runs") == [{"name": "a"}, {"name": "b"}]
    assert harness.load_runs(tmp_path / "none") == []


def _local_imports(path: Path, names: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-local imports too
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module in names:
            found.add(node.module)
    return found


def test_the_benchmarks_import_no_circle():
    scripts = {p.stem: p for p in BENCH.glob("*.py")}
    edges = {name: _local_imports(path, set(scripts)) for name, path in scripts.items()}

    def reaches(a, b, seen=frozenset()):
        return any(x == b or (x not in seen and reaches(x, b, seen | {x})) for x in edges[a])

    assert [name for name in scripts if reaches(name, name)] == []
    assert "deepspeed_moe" not in edges["_deepspeed_moe_report"]
    for name in ("moe_vs_dense", "deepspeed_moe", "moma", "multitask"):
        assert "_harness" in edges[name], name
