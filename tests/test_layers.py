"""MoE layer variants: shared experts, Residual-MoE, pyramid schedules, Mixture-of-Depths."""

import pytest
import torch
import torch.nn as nn

from moekit.config import MoEConfig
from moekit.moe.layers import MixtureOfDepths, MoELayer, ResidualMoE, pyramid_schedule


def test_shared_expert_with_sigmoid_gate_is_added():
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=16, num_experts=4, top_k=2, expert_hidden=8, num_shared_experts=1,
                    shared_expert_hidden=24, shared_expert_gate=True)
    layer = MoELayer(cfg)
    x_TD = torch.randn(10, 16)
    y, routing = layer(x_TD)
    x_ND, counts_E, order_N = layer.dispatcher.dispatch(x_TD, routing)
    routed = layer.dispatcher.combine(layer.experts(x_ND, counts_E, kernel="loop"), routing, order_N)
    shared = torch.sigmoid(layer.shared_gate(x_TD)) * layer.shared(x_TD)
    torch.testing.assert_close(y, routed + shared, atol=1e-6, rtol=1e-6)
    assert layer.shared.down_proj.weight.shape == (16, 24)


def test_residual_moe_mixes_mlp_and_expert():
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=16, num_experts=4, top_k=1, expert_hidden=8)
    block = ResidualMoE(cfg, mlp_hidden=32)
    x = torch.randn(3, 16)
    with torch.no_grad():
        moe_alone, _ = block.moe(x)
        mlp_alone = block.mlp(x)
        assert not torch.allclose(moe_alone, mlp_alone, atol=1e-3)  # else the cases below could not tell them apart
        block.coefficient.weight.zero_()
        for bias, alone in (((30.0, -30.0), moe_alone), ((-30.0, 30.0), mlp_alone)):  # the mix is (1, 0), then (0, 1)
            block.coefficient.bias.copy_(torch.tensor(bias))
            torch.testing.assert_close(block(x)[0], alone, atol=1e-6, rtol=0)
        # One token, known weights: x = e_0, row 0 of the coefficient map = ln(3) e_0, row 1 and bias zero, so the logits
        # are (ln 3, 0) and the mix is (3/4, 1/4) by hand.
        x1 = torch.zeros(1, 16)
        x1[0, 0] = 1.0
        block.coefficient.bias.zero_()
        block.coefficient.weight[0, 0] = torch.log(torch.tensor(3.0))
        want = 0.75 * block.moe(x1)[0] + 0.25 * block.mlp(x1)
        torch.testing.assert_close(block(x1)[0], want, atol=1e-6, rtol=1e-5)
    block = ResidualMoE(cfg, mlp_hidden=32)
    y, routing = block(x)
    y.sum().backward()
    assert block.coefficient.weight.grad.abs().sum() > 0


def test_pyramid_schedule():
    assert pyramid_schedule(12, [32, 64], [10, 2]) == [32] * 10 + [64] * 2
    assert pyramid_schedule(5, [4, 8]) == [4, 4, 8, 8, 8]
    with pytest.raises(ValueError, match="layers_per_stage"):
        pyramid_schedule(4, [4, 8], [1, 1])


class CausalMeanBlock(nn.Module):
    """A toy causal block: each token adds the mean of the tokens up to it, times its position."""

    def forward(self, x_BCD, positions_BC):
        cum = x_BCD.cumsum(1) / torch.arange(1, x_BCD.shape[1] + 1)[None, :, None]
        return x_BCD + cum * (1 + positions_BC[..., None].float())


def test_mixture_of_depths_routes_top_capacity_tokens():
    torch.manual_seed(0)
    mod = MixtureOfDepths(CausalMeanBlock(), hidden_size=8, capacity=0.25).train()
    x = torch.randn(2, 12, 8)
    y, aux = mod(x)
    score = mod.router(x).squeeze(-1)
    for b in range(2):
        idx = score[b].topk(3).indices.sort().values
        new = CausalMeanBlock()(x[b, idx][None], idx[None])[0]
        w = torch.sigmoid(score[b, idx])[:, None]
        expected = x[b].clone()
        expected[idx] = x[b, idx] + w * (new - x[b, idx])
        torch.testing.assert_close(y[b], expected)
    assert aux["mod_predictor"] > 0
    y.sum().backward()
    assert mod.router.weight.grad.abs().sum() > 0


def test_mixture_of_depths_predictor_is_causal_at_inference():
    torch.manual_seed(0)
    mod = MixtureOfDepths(CausalMeanBlock(), hidden_size=8, capacity=0.5).eval()
    with torch.no_grad():
        mod.predictor[-1].bias.fill_(0.05)  # make the predictor choose some tokens
        x = torch.randn(1, 10, 8)
        y1, _ = mod(x)
        x2 = x.clone()
        x2[:, 6:] = torch.randn(1, 4, 8)  # change the future only
        y2, _ = mod(x2)
    torch.testing.assert_close(y1[:, :6], y2[:, :6])
    assert not torch.equal(y1, x)  # some tokens went through the block
