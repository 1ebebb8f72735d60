"""Routers, capacity and losses against hand computations."""

import math

import pytest
import torch

from moekit.config import MoEConfig
from moekit.moe.balance import update_expert_bias
from moekit.moe.dispatch import LocalDispatcher, capacity_keep_mask, expert_capacity
from moekit.moe.layers import MoELayer
from moekit.moe.routing import (
    ExpertChoiceRouter,
    GroupRouter,
    Routing,
    TopKRouter,
    load_balance_loss,
    sequence_balance_loss,
    z_loss,
)


def fixed_router(cfg, weight_ED):
    router = TopKRouter(cfg) if cfg.router == "topk" else GroupRouter(cfg)
    with torch.no_grad():
        router.gate.weight.copy_(weight_ED)
    return router


def test_topk_softmax_renormalised_weights_and_scaling():
    cfg = MoEConfig(hidden_size=3, num_experts=3, top_k=2, routed_scaling_factor=2.0)
    router = fixed_router(cfg, torch.eye(3))
    x = torch.tensor([[1.0, 2.0, 0.0]])
    r = router(x)
    p = torch.softmax(x[0], -1)
    assert r.expert_idx_N.tolist() == [1, 0]
    expected = torch.stack([p[1], p[0]]) / (p[0] + p[1]) * 2.0
    torch.testing.assert_close(r.weight_N, expected)


def test_topk_sigmoid_unnormalised():
    cfg = MoEConfig(hidden_size=3, num_experts=3, top_k=2, score_func="sigmoid", norm_topk_prob=False)
    r = fixed_router(cfg, torch.eye(3))(torch.tensor([[0.5, -1.0, 2.0]]))
    assert r.expert_idx_N.tolist() == [2, 0]
    torch.testing.assert_close(r.weight_N, torch.sigmoid(torch.tensor([2.0, 0.5])))


def test_load_balance_loss_hand_computation():
    # 4 tokens, 2 experts, top-1: 3 tokens choose expert 0, 1 chooses expert 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    idx = torch.tensor([[0], [0], [0], [1]])
    f = torch.tensor([3 / 4, 1 / 4])
    P = torch.tensor([(0.9 + 0.8 + 0.6 + 0.3) / 4, (0.1 + 0.2 + 0.4 + 0.7) / 4])
    expected = 2 * (f * P).sum()  # = 2 * (0.75*0.65 + 0.25*0.35) = 1.15
    assert math.isclose(float(load_balance_loss(probs, idx, 2)), 1.15, rel_tol=1e-6)
    torch.testing.assert_close(load_balance_loss(probs, idx, 2), expected)
    # per sequence: two sequences of two tokens, averaged
    s1 = 2 * (torch.tensor([1.0, 0.0]) * torch.tensor([0.85, 0.15])).sum()
    s2 = 2 * (torch.tensor([0.5, 0.5]) * torch.tensor([0.45, 0.55])).sum()
    torch.testing.assert_close(sequence_balance_loss(probs, idx, 2, batch_size=2), (s1 + s2) / 2)


def test_z_loss_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert math.isclose(float(z_loss(logits)), expected, rel_tol=1e-6)


def make_routing(expert_TK, num_experts):
    T, K = expert_TK.shape
    return Routing(
        token_idx_N=torch.arange(T).repeat_interleave(K),
        expert_idx_N=expert_TK.reshape(-1),
        weight_N=torch.ones(T * K),
        num_tokens=T,
        num_experts=num_experts,
        logits_TE=torch.zeros(T, num_experts),
        probs_TE=torch.full((T, num_experts), 1 / num_experts),
    )


def test_capacity_formula():
    assert expert_capacity(100, 2, 8, 1.0) == math.ceil(2 * 100 / 8 * 1.0) == 25
    assert expert_capacity(100, 1, 8, 1.25) == math.ceil(100 / 8 * 1.25) == 16
    assert expert_capacity(10, 1, 8, 0.5, min_capacity=4) == 4
    assert expert_capacity(100, 2, 8, 0.0) is None
    assert expert_capacity(100, 2, 8, -1.0) is None


def test_capacity_drops_exactly_the_overflow_by_position():
    torch.manual_seed(0)
    T, K, E = 64, 2, 4
    expert_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    expert_TK[:40, 0] = 0  # skew: expert 0 is everyone's first choice for 40 tokens
    routing = make_routing(expert_TK, E)
    factor = 1.0
    cap = expert_capacity(T, K, E, factor)
    limited = LocalDispatcher().limit(routing, K, factor)
    selected = torch.bincount(expert_TK.reshape(-1), minlength=E)
    assert limited.counts_E.tolist() == selected.clamp(max=cap).tolist()
    assert limited.num_dropped == int((selected - cap).clamp(min=0).sum())
    # position policy: first choices before second, then earlier tokens first
    kept_first_choice = limited.token_idx_N[(limited.expert_idx_N == 0)]
    assert sorted(kept_first_choice.tolist()) == list(range(cap))
    assert limited.stats()["dropped_fraction"] == pytest.approx(limited.num_dropped / (T * K))


def test_random_token_selection_is_reproducible_with_a_seed():
    expert_TK = torch.zeros(50, 1, dtype=torch.long)  # every token wants expert 0
    routing = make_routing(expert_TK, 2)
    masks = [capacity_keep_mask(routing, 10, "random", torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert int(masks[0].sum()) == 10
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])
    assert masks[0][:10].sum() < 10  # not simply the first tokens


def test_expert_choice_fills_every_expert_exactly():
    cfg = MoEConfig(hidden_size=8, num_experts=4, router="expert_choice", capacity_factor=2.0)
    router = ExpertChoiceRouter(cfg)
    T = 30
    r = router(torch.randn(T, 8))
    C = math.ceil(T * 2.0 / 4)
    assert r.counts_E.tolist() == [C] * 4
    layer = MoELayer(cfg)
    y, r2 = layer(torch.randn(2, 15, 8))
    assert y.shape == (2, 15, 8) and r2.counts_E.tolist() == [C] * 4


def test_group_router_keeps_tokens_in_their_group():
    cfg = MoEConfig(hidden_size=8, num_experts=6, top_k=2, router="group", num_groups=3)
    router = GroupRouter(cfg)
    group_ids = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    r = router(torch.randn(7, 8), group_ids_T=group_ids)
    assert torch.equal(r.expert_idx_N // 2, group_ids[r.token_idx_N])
    torch.testing.assert_close(r.weight_N.view(7, 2).sum(-1), torch.ones(7))
    with pytest.raises(ValueError, match="group ids must be in"):
        router(torch.randn(2, 8), group_ids_T=torch.tensor([0, 3]))


def test_group_limited_routing_uses_only_topk_groups():
    cfg = MoEConfig(hidden_size=16, num_experts=16, top_k=4, n_group=4, topk_group=2, score_func="sigmoid")
    r = TopKRouter(cfg)(torch.randn(50, 16))
    groups_per_token = (r.expert_idx_N.view(50, 4) // 4).tolist()
    assert all(len(set(g)) <= 2 for g in groups_per_token)
    assert any(len(set(g)) == 2 for g in groups_per_token)


def test_bias_balancing_lowers_max_over_mean_load():
    torch.manual_seed(0)
    E = 8
    cfg = MoEConfig(hidden_size=16, num_experts=E, top_k=2, bias_update_rate=0.01, score_func="sigmoid")
    router = TopKRouter(cfg).train()
    with torch.no_grad():
        router.gate.weight.normal_(0, 0.1)
        router.gate.weight[0] += 0.5  # inputs below are skewed toward experts 0 and 1
        router.gate.weight[1] += 0.4
    x_mean = torch.ones(16)

    def max_over_mean(r):
        c = r.counts_E.float()
        return float(c.max() / c.mean())

    before = max_over_mean(router(torch.randn(512, 16) * 0.5 + x_mean))
    for _ in range(200):
        router(torch.randn(512, 16) * 0.5 + x_mean)
        update_expert_bias([router])  # what the optimizer pre-step hook does (moe/balance.py)
    after = max_over_mean(router(torch.randn(512, 16) * 0.5 + x_mean))
    assert before > 2.0
    assert after < 0.6 * before
    assert router.gate.weight.grad is None  # the bias is not learned by gradient


def test_bias_steers_selection_not_weights():
    cfg = MoEConfig(hidden_size=4, num_experts=4, top_k=1, score_func="sigmoid", bias_update_rate=0.1)
    router = fixed_router(cfg, torch.eye(4)).eval()
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    r = router(torch.tensor([[3.0, 0.0, 0.0, 0.0]]))
    assert r.expert_idx_N.tolist() == [2]
    torch.testing.assert_close(r.weight_N, torch.tensor([1.0]))  # renormalised single choice


def test_noise_policies_only_act_in_training():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    for policy in ("jitter", "rsample"):
        router = TopKRouter(MoEConfig(hidden_size=16, num_experts=8, top_k=2, noise_policy=policy))
        router.eval()
        a, b = router(x), router(x)
        assert torch.equal(a.expert_idx_N, b.expert_idx_N)
        router.train()
        runs = [router(x) for _ in range(5)]
        # jitter perturbs the inputs (so the weights); rsample the selection
        changed = [
            not torch.equal(runs[0].expert_idx_N, r.expert_idx_N) or not torch.equal(runs[0].weight_N, r.weight_N)
            for r in runs[1:]
        ]
        assert any(changed), policy


def test_rsample_weights_come_from_clean_scores():
    router = TopKRouter(MoEConfig(hidden_size=16, num_experts=8, top_k=2, noise_policy="rsample")).train()
    x = torch.randn(32, 16)
    r = router(x)
    clean = torch.softmax(router.gate(x), -1)
    w = clean.gather(-1, r.expert_idx_N.view(32, 2))
    torch.testing.assert_close(r.weight_N.view(32, 2), w / w.sum(-1, keepdim=True))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(num_experts=0), "num_experts"),
        (dict(capacity_factor=float("nan")), "capacity_factor"),
        (dict(score_func="relu"), "score_func"),
        (dict(num_experts=8, n_group=3), "n_group"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**kwargs)


def test_hidden_size_mismatch_is_named():
    layer = MoELayer(MoEConfig(hidden_size=16, num_experts=2, top_k=1, expert_hidden=8))
    with pytest.raises(ValueError, match="hidden_size=16"):
        layer(torch.randn(3, 12))


def test_stats_and_aux_losses_are_returned():
    layer = MoELayer(MoEConfig(hidden_size=16, num_experts=4, top_k=2, expert_hidden=8, capacity_factor=1.0))
    y, r = layer(torch.randn(2, 10, 16))
    assert set(r.aux_losses) == {"balance", "z"}
    s = r.stats()
    assert 0 <= s["dropped_fraction"] <= 1 and s["max_over_mean_load"] >= 1 and s["router_entropy"] > 0
    assert int(r.counts_E.sum()) + r.num_dropped == 40
