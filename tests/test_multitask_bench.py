"""benchmarks/multitask.py's fairness bookkeeping and targets, checked by hand."""

import importlib.util
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
