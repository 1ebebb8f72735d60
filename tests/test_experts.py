"""Every expert kernel computes what the `loop` reference computes, forward and backward."""

import pytest
import torch

from moekit.config import MoEConfig
from moekit.experts import Experts
from moekit.layers import MoELayer
from moekit.modules import SwiGLU

KERNELS = ["grouped_mm", "bmm", "auto"]


def run_kernel(experts, x, counts, kernel):
    experts.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = experts(x, counts, kernel=kernel)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, experts.w_in_EHD.grad.clone(), experts.w_out_EDF.grad.clone()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize(
    "counts",
    [[3, 0, 5, 1, 0, 7, 2, 0], [0, 0, 0, 16, 0, 0, 0, 0], [4] * 8, [0] * 8],
    ids=["some-empty", "all-to-one", "even", "no-tokens"],
)
def test_kernel_matches_loop(kernel, activation, counts):
    torch.manual_seed(0)
    experts = Experts(8, 32, 16, activation)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), 32)
    ref = run_kernel(experts, x, counts, "loop")
    got = run_kernel(experts, x, counts, kernel)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kernel", KERNELS)
def test_moe_layer_kernels_match_loop_on_random_configs(seed, kernel):
    g = torch.Generator().manual_seed(seed)
    E = int(torch.randint(1, 9, (1,), generator=g))
    k = int(torch.randint(1, E + 1, (1,), generator=g))
    D = 8 * int(torch.randint(1, 5, (1,), generator=g))
    cfg = MoEConfig(hidden_size=D, num_experts=E, top_k=k, expert_hidden=12 + 4 * seed, kernel="loop")
    torch.manual_seed(seed)
    layer = MoELayer(cfg)
    x = torch.randn(2, 7, D)
    outputs = []
    for name in ("loop", kernel):
        layer.experts.kernel = name
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        y, _ = layer(xi)
        y.pow(2).sum().backward()
        outputs.append([y.detach(), xi.grad] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_one_expert_moe_equals_dense_mlp():
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=16, num_experts=1, top_k=1, expert_hidden=24)
    moe = MoELayer(cfg)
    dense = SwiGLU(16, 24)
    with torch.no_grad():
        moe.experts.w_in_EHD[0].copy_(torch.cat([dense.gate_proj.weight, dense.up_proj.weight]))
        moe.experts.w_out_EDF[0].copy_(dense.down_proj.weight)
    x1 = torch.randn(3, 5, 16, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y_moe, routing = moe(x1)
    y_dense = dense(x2)
    torch.testing.assert_close(y_moe, y_dense, atol=1e-6, rtol=1e-6)
    assert torch.all(routing.weight_N == 1)
    y_moe.sum().backward()
    y_dense.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-6)
    gate_up_grad = torch.cat([dense.gate_proj.weight.grad, dense.up_proj.weight.grad])
    torch.testing.assert_close(moe.experts.w_in_EHD.grad[0], gate_up_grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(moe.experts.w_out_EDF.grad[0], dense.down_proj.weight.grad, atol=1e-6, rtol=1e-6)


def test_unknown_kernel_is_rejected_naming_the_choices():
    with pytest.raises(ValueError, match="kernel='fast'.*loop"):
        MoEConfig(kernel="fast")
    experts = Experts(2, 8, 8)
    with pytest.raises(ValueError, match="kernel='nope'"):
        experts(torch.randn(2, 8), torch.tensor([1, 1]), kernel="nope")
