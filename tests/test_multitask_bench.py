"""benchmarks/multitask.py's fairness bookkeeping and targets, checked by hand."""

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from moekit.data.mathtasks import TASKS
from moekit.models.decoder import DecoderLM, count_parameters

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "multitask.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("multitask_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_moe_and_dense_have_the_same_ffn_active_parameters(bench):
    s = bench.QUICK
    sizes = {}
    for kind in ("moe_task", "moe_plain", "dense"):
        cfg = bench.run_config(kind, s, TASKS, 10, 0)
        sizes[kind] = count_parameters(DecoderLM(replace(cfg.model, vocab_size=257)))["active"]
    D, L, E, G = s.hidden, s.layers, 8, len(TASKS)
    assert sizes["moe_plain"] - sizes["dense"] == L * D * E  # only the routers' gates differ
    assert sizes["moe_task"] - sizes["moe_plain"] == L * G * D  # plus the task embeddings


def test_targets_can_fail_and_pass(bench):
    def models(moe, dense, each):
        em = lambda v: {**dict(zip(TASKS, v)), "mean": sum(v) / len(v)}  # noqa: E731
        return {"moe_task": {"exact_match": em(moe)}, "dense_multi": {"exact_match": em(dense)},
                "dense_each": {"exact_match": em(each)}}

    good = bench.targets_for(models([0.5] * 5, [0.4, 0.4, 0.4, 0.4, 0.6], [0.505] * 5))
    assert [t["met"] for t in good] == [True, True, True]
    assert good[1]["value"] == 4 and good[2]["value"] == pytest.approx(-0.5)
    bad = bench.targets_for(models([0.5] * 5, [0.5, 0.5, 0.5, 0.4, 0.6], [0.52] * 5))
    assert [t["met"] for t in bad] == [False, False, False]


def _variant_record(name, ems, steps, lr, load):
    return {"variant": name, "kind": "x", "lr": lr, "seed": 0, "scale": {}, "command": "c", "machine": {"load_average_1m": load},
            "model": {"steps": steps, "exact_match": {**dict(zip(TASKS, ems)), "mean": sum(ems) / len(ems)}}}


def test_ablation_table_is_assembled_from_the_saved_variant_files(bench, tmp_path):
    results = tmp_path / "results"
    bench.save_variant(_variant_record("moe_task_2x_steps", [0.1, 0.2, 0.3, 0.4, 0.5], 3000, 6e-3, 4.5), results / "multitask")
    bench.save_variant(_variant_record("moe_plain", [0.0, 0.0, 0.25, 0.5, 1.0], 1500, 6e-3, None), results / "multitask")
    (results / "multitask" / "not_a_variant.json").write_text("{}")  # ignored: not in VARIANTS
    text = bench.ablation_markdown(None, results / "multitask")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert rows == [  # VARIANTS order; means by hand: 1.5 / 5 = 0.3, 1.75 / 5 = 0.35
        "| moe_plain | 1500 | 0.006 | 0 | 0.0 | 0.0 | 25.0 | 50.0 | 100.0 | 35.0 | None |",
        "| moe_task_2x_steps | 3000 | 0.006 | 0 | 10.0 | 20.0 | 30.0 | 40.0 | 50.0 | 30.0 | 4.5 |",
    ]
    assert "Not run (no saved result; `--variant NAME` saves one): moe_task_half_lr, dense_multi_2x_steps, " \
           "dense_multi_half_lr." in text
    assert "No saved results yet." in bench.ablation_markdown(None, tmp_path / "empty")


def test_report_is_rebuilt_from_json_and_keeps_recorded_figures_apart(bench, tmp_path):
    em = lambda v: {**dict(zip(TASKS, v)), "mean": sum(v) / len(v)}  # noqa: E731
    model = {"exact_match": em([0.5] * 5), "val_loss": 1.0, "steps": 10, "tokens": 100, "params": {"active": 1, "total": 2}}
    main = {"models": {"moe_task": model, "dense_multi": model, "dense_each": {**model, "val_loss": None}},
            "scale": {"test_size": 4, "lr": 3e-3}, "seed": 1, "machine": {"load_average_1m": 2.0}, "command": "python x",
            "note": "n", "targets": []}
    results = tmp_path / "results"
    results.mkdir()
    (results / "multitask.json").write_text(json.dumps(main))
    before = (results / "multitask.json").read_text()
    bench.save_variant(_variant_record("dense_multi_half_lr", [0.2] * 5, 10, 1.5e-3, 3.0), results / "multitask")
    text = bench.write_report(results).read_text()
    assert (results / "multitask.json").read_text() == before and sorted(p.name for p in results.iterdir()) == [
        "multitask", "multitask.json", "multitask.md"]
    generated, recorded = text.split("## Ablations recorded from earlier runs, not regenerated")
    assert "| moe_task (the main run above) | 10 | 0.003 | 1 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 2.0 |" in generated
    assert "| dense_multi_half_lr | 10 | 0.0015 | 0 | 20.0 | 20.0 | 20.0 | 20.0 | 20.0 | 20.0 | 3.0 |" in generated
    assert "13.9" not in generated and "| moe_task_2x_steps (3000 steps, twice the tokens) | 18.0 |" in recorded
    assert "commit 6e2ab31" in recorded and "nothing here is computed by this script" in recorded
