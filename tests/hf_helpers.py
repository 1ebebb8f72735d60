"""Helpers shared by the Hugging Face tests (test_hf*.py): tiny transformers models, padded batches, logits.

Holds: the prompts, left-padded batches, moekit and transformers logits on them, building and saving a
tiny random transformers model, the module-scoped `family_dir` fixture factory, and the checks every
family runs (greedy tokens against `generate`, cached decode against a full forward, export round
trip). Does NOT hold any family's sizes or quirks (each test file keeps its own FAMILIES), nor
assertions about one family only.
"""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moekit import hf
from moekit.infer import Engine

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15], [20, 21, 22, 23, 24, 25]]


def padded(prompts):
    P = max(map(len, prompts))
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        mask[b, P - len(p):] = 1
    return ids, mask


@torch.no_grad()
def moekit_logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return model(ids, mask, positions).logits


@torch.no_grad()
def hf_logits(ref, ids, mask):
    """transformers' own logits: the oracle."""
    return ref(input_ids=ids, attention_mask=mask).logits


def logit_gap(ref, model, prompts=PROMPTS):
    """Largest |moekit - transformers| logit over the real (unpadded) tokens of `prompts`."""
    ids, mask = padded(prompts)
    return (moekit_logits(model, ids, mask) - hf_logits(ref, ids, mask))[mask.bool()].abs().max()


def tiny_hf(family, base, family_kw, overrides, seed=0):
    """A random transformers model of `family`: `base` sizes, then the family's and the test's overrides."""
    torch.manual_seed(seed)
    kw = dict(base)
    kw.update(family_kw)
    kw.update(overrides)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).eval()


def family_fixture(build_hf, families, **save_kw):
    """A module-scoped fixture over `families`: (family, transformers model, its saved directory).

    With `max_shard_size` in `save_kw` the save must be sharded (an index file)."""

    @pytest.fixture(scope="module", params=list(families))
    def family_dir(request, tmp_path_factory):
        family = request.param
        ref = build_hf(family)
        path = tmp_path_factory.mktemp(family)
        ref.save_pretrained(path, **save_kw)
        if "max_shard_size" in save_kw:
            assert (path / hf.INDEX_FILE).is_file()
        return family, ref, path

    return family_dir


def greedy_against_generate(ref, path, prompts=PROMPTS, max_new_tokens=32):
    """moekit's greedy completions must equal transformers' `generate`; returns the completions."""
    ids, mask = padded(prompts)
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)[:, ids.shape[1]:]
    out = Engine.load(path).generate(prompts, max_new_tokens=max_new_tokens, temperature=0)
    for completion, row in zip(out, expected.tolist()):
        assert completion.token_ids == row
    return out


def cached_decode_against_full_forward(path, inspect_cache=None):
    """Prefill all but the last 4 tokens, decode them one at a time through the engine's cached steps:
    the logits must equal one full forward. `inspect_cache(cache, B, P)` may check the fresh cache."""
    engine = Engine.load(path)
    model = engine.model
    prompts = [p + [30 + i, 31, 32, 33] for i, p in enumerate(PROMPTS)]
    ids, mask = padded(prompts)
    full = moekit_logits(model, ids, mask)
    B, P = ids.shape
    keep = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = model.new_cache(B, P)
    if inspect_cache is not None:
        inspect_cache(cache, B, P)
    with torch.no_grad():
        steps = [engine._step(ids[:, :-4], positions[:, :-4], keep, cache, 0)]
        for t in range(P - 4, P - 1):  # one-token steps (the absorbed form for MLA)
            steps.append(engine._step(ids[:, t:t + 1], positions[:, t:t + 1], keep, cache, t))
    torch.testing.assert_close(torch.stack(steps, 1), full[:, P - 5:P - 1], atol=1e-5, rtol=1e-5)


def export_round_trip(ref, out):
    """transformers reloads moekit's export `out` to ref's logits, and so does moekit."""
    reloaded_hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids, mask = padded(PROMPTS)
    real = mask.bool()
    expected = hf_logits(ref, ids, mask)
    again = hf_logits(reloaded_hf, ids, mask)
    assert (again[real] - expected[real]).abs().max() <= 1e-5
    assert (moekit_logits(hf.load(out), ids, mask)[real] - expected[real]).abs().max() <= 1e-4
