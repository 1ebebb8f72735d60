"""The decoupled (Read-ME) router: cached decode equals the full forward, training, save/load, CLI."""

import pytest
import torch

from moekit import moefy
from moekit.moefy.readme_lm import make_readme_lm
from moekit.moefy.router import DecoupledRouter, RouterConfig
from moekit.moefy.tune import train_decoupled, vote_targets

from test_moefy_convert import dense_lm


def test_router_cached_decode_equals_full_forward():
    torch.manual_seed(0)
    router = DecoupledRouter(RouterConfig(vocab_size=50, host_hidden=32, num_experts=4, num_layers=2, hidden_size=32), torch.randn(50, 32)).eval()
    ids = torch.randint(0, 50, (3, 14))
    with torch.no_grad():
        full = router(ids)
        cache = router.new_cache(3, 32)
        parts = [router(ids[:, :5], cache, 0)] + [router(ids[:, t : t + 1], cache, t) for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_router_with_left_padding_routes_each_row_as_alone_and_caches_alike():
    torch.manual_seed(0)
    router = DecoupledRouter(RouterConfig(vocab_size=50, host_hidden=32, num_experts=4, num_layers=2, hidden_size=32), torch.randn(50, 32)).eval()
    rows = [torch.randint(0, 50, (n,)) for n in (10, 4, 7)]
    T, P = 10, 6  # P: the prefill's length; the rest decodes one token at a time
    ids = torch.zeros(3, T, dtype=torch.long)
    keep = torch.zeros(3, T, dtype=torch.bool)
    for b, r in enumerate(rows):  # left padding, as moekit.infer.Engine lays out a batch
        ids[b, T - len(r):], keep[b, T - len(r):] = r, True
    positions = (keep.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        full = router(ids, attention_mask_BK=keep, positions_BT=positions)
        for b, r in enumerate(rows):  # oracle: each row alone, unpadded
            torch.testing.assert_close(full[b, T - len(r):], router(r[None])[0], rtol=1e-5, atol=1e-5)
        cache = router.new_cache(3, 16)
        parts = [router(ids[:, :P], cache, 0, keep[:, :P], positions[:, :P])]
        parts += [router(ids[:, t : t + 1], cache, t, keep[:, : t + 1], positions[:, t : t + 1]) for t in range(P, T)]
    cached = torch.cat(parts, 1)
    torch.testing.assert_close(cached[keep], full[keep], rtol=1e-5, atol=1e-5)


def readme_model():
    dense = dense_lm()
    calib = [torch.randint(0, 25, (4, 32)), torch.randint(25, 50, (4, 32))]
    moe = moefy.convert(dense, method="readme", experts=4, top_k=1, shared_fraction=0.25, calib=calib, router="decoupled")
    return dense, make_readme_lm(moe, {"hidden_size": 32}), calib


def test_readme_lm_routes_every_layer_alike_and_decodes_with_cache():
    dense, model, _ = readme_model()
    model.eval()
    assert torch.equal(model.router.embed_tokens.weight, dense.embed_tokens.weight)  # initialised from the host
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        out = model(ids)
        experts = model.experts_for(ids).reshape(-1)
        for r in out.routings:  # one expert per token, the same in every layer
            assert torch.equal(r.expert_idx_N, experts)
        cache = model.new_cache(2, 32)
        steps = [model(ids[:, :4], kv_cache=cache, cache_start=0).logits]
        steps += [model(ids[:, t : t + 1], kv_cache=cache, cache_start=t).logits for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), out.logits, rtol=1e-4, atol=1e-4)


def test_training_learns_the_vote_targets_and_roundtrips(tmp_path):
    dense, model, calib = readme_model()
    stream = torch.cat([c.reshape(-1) for c in calib])
    ids = stream[:64].view(2, 32)

    def agreement():
        with torch.no_grad():
            return float((model.router(ids).argmax(-1) == vote_targets(dense, model, ids).argmax(-1)).float().mean())

    before = agreement()
    log = train_decoupled(dense, model, stream, rounds=2, steps=40, batch_size=4, seq_len=32, router_lr=1e-2)
    assert [e["phase"] for e in log] == ["distill", "experts", "distill", "experts"]
    assert agreement() > max(before, 0.5)
    model.eval()
    again = moefy.load(moefy.save(model, tmp_path / "rm"))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_decoupled_needs_sliced_experts():
    with pytest.raises(moefy.MoefyError, match="decoupled router needs experts that are slices"):
        moefy.convert(dense_lm(), method="upcycle", experts=2, top_k=1, router="decoupled")


def test_tuning_trains_where_the_model_is_even_when_cuda_is_said_to_exist(monkeypatch):
    """train.device defaults to auto; a tuning phase must not send the router to a GPU while the dense teacher and
    the experts stay on the CPU (with auto and a CUDA machine, fit would move only the trained module)."""
    dense, model, calib = readme_model()
    stream = torch.cat([c.reshape(-1) for c in calib])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # (with `auto`, fit would now call torch.cuda.current_device() and fail on this CPU-only build)
    log = train_decoupled(dense, model, stream, rounds=1, steps=2, batch_size=2, seq_len=16)
    assert [e["phase"] for e in log] == ["distill", "experts"]
    assert {p.device.type for p in model.parameters()} == {"cpu"}
