"""Every expert kernel computes what the `loop` reference computes, forward and backward."""

import pytest
import torch

from moekit.config import MoEConfig
from moekit.moe.experts import Experts
from moekit.moe.layers import MoELayer
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


# ---------------------------------------------------------------- fast paths: padded dispatch, fused MLP, combine


def layer_grads(layer, x, kernel, seed=0):
    layer.experts.kernel = kernel
    layer.zero_grad()
    xi = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # same jitter / RTS draws for every kernel
    y, _ = layer(xi)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.detach(), xi.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    "overrides",
    [
        {},  # dropless top-k: token-major, gather-and-sum combine
        {"capacity_factor": 0.6},  # dropped assignments: the general scatter path
        {"router": "expert_choice", "capacity_factor": 1.0},
        {"activation": "gelu", "top_k": 1},
        {"num_experts": 16, "top_k": 4, "score_func": "sigmoid"},
    ],
    ids=["dropless", "capacity", "expert-choice", "gelu-top1", "sigmoid-16"],
)
def test_layer_fast_path_matches_loop(kernel, overrides):
    torch.manual_seed(0)
    cfg = MoEConfig(**{"hidden_size": 32, "num_experts": 8, "top_k": 2, "expert_hidden": 16, **overrides})
    layer = MoELayer(cfg).train()
    x = torch.randn(3, 40, 32)
    ref = layer_grads(layer, x, "loop")
    got = layer_grads(layer, x, kernel)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_auto_pads_the_layer_buffer_for_bmm():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=32, num_experts=4, top_k=2, expert_hidden=16))
    x_TD = torch.randn(64, 32)
    routing = layer.router(x_TD)
    counts_E = routing.counts_E
    assert layer.experts.kernel_for(x_TD, counts_E) == "bmm"
    slots = layer.dispatcher.slots(routing, int(counts_E.max()))
    assert slots.num_rows == 4 * int(counts_E.max()) and slots.top_k == 2
    x_SD = layer.dispatcher.gather(x_TD, routing, slots)
    real = torch.zeros(slots.num_rows, dtype=torch.bool)
    real[slots.slot_N] = True
    assert torch.equal(x_SD[real.nonzero().squeeze(1)], x_TD[slots.token_S[real]])
    assert not x_SD[~real].any()  # padding rows are zero
    rows = torch.cat([slots.slot_N, slots.pad_rows]).sort().values
    assert torch.equal(rows, torch.arange(slots.num_rows))  # every row is an assignment or padding, once


@pytest.mark.parametrize("token_major", [True, False])
def test_gather_and_combine_match_indexing(token_major):
    from moekit.moe.dispatch import LocalDispatcher
    from moekit.moe.routing import Routing

    torch.manual_seed(0)
    T, K, E, D = 12, 3, 5, 8
    if token_major:
        token_N = torch.arange(T).repeat_interleave(K)
        expert_N = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).reshape(-1)
    else:  # some tokens dropped, some used once
        token_N = torch.tensor([0, 0, 2, 3, 3, 3, 5, 7, 7, 11])
        expert_N = torch.tensor([1, 4, 0, 0, 2, 3, 1, 4, 0, 2])
    weight = torch.rand(token_N.numel(), requires_grad=True)
    routing = Routing(token_N, expert_N, weight, T, E, torch.zeros(T, E), torch.zeros(T, E))
    x = torch.randn(T, D, requires_grad=True)
    g = torch.randn(T, D)
    d = LocalDispatcher()
    for capacity in (None, int(routing.counts_E.max()) + 2):
        slots = d.slots(routing, capacity)
        assert slots.top_k == (K if token_major else 0)
        x_SD = d.gather(x, routing, slots)
        y_SD = x_SD * torch.arange(1.0, D + 1)  # stands in for the experts
        y = d.combine_slots(y_SD, routing, slots)
        grads = torch.autograd.grad((y * g).sum(), (x, weight))
        x2 = x.detach().clone().requires_grad_(True)
        w2 = weight.detach().clone().requires_grad_(True)
        rows = x2[token_N] * torch.arange(1.0, D + 1) * w2[:, None]
        y2 = torch.zeros(T, D).index_add(0, token_N, rows)
        grads2 = torch.autograd.grad((y2 * g).sum(), (x2, w2))
        torch.testing.assert_close(y, y2, atol=1e-6, rtol=1e-6)
        for a, b in zip(grads, grads2):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_dispatch_and_combine_keep_their_contract():
    """dispatch -> (x_ND sorted by expert, counts, order_N); combine(y, routing, order_N) undoes it."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=16, num_experts=4, top_k=2, expert_hidden=8))
    x_TD = torch.randn(10, 16)
    routing = layer.router(x_TD)
    x_ND, counts_E, order_N = layer.dispatcher.dispatch(x_TD, routing)
    assert torch.equal(x_ND, x_TD[routing.token_idx_N[order_N]])
    assert torch.equal(routing.expert_idx_N[order_N], torch.repeat_interleave(torch.arange(4), counts_E))
    y = layer.dispatcher.combine(x_ND, routing, order_N)
    expected = torch.zeros(10, 16).index_add(0, routing.token_idx_N, x_TD[routing.token_idx_N] * routing.weight_N[:, None])
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kernel", ["bmm", "grouped_mm"])
def test_kernels_without_grad_match_with_grad(kernel):
    torch.manual_seed(0)
    experts = Experts(4, 32, 16)
    counts = torch.tensor([5, 0, 9, 2])
    x = torch.randn(16, 32)
    with torch.no_grad():
        y_no_grad = experts(x, counts, kernel=kernel)
    torch.testing.assert_close(y_no_grad, experts(x, counts, kernel=kernel).detach(), atol=1e-6, rtol=1e-6)


def test_frozen_experts_still_give_input_gradients():
    torch.manual_seed(0)
    experts = Experts(4, 32, 16).requires_grad_(False)
    counts = torch.tensor([3, 5, 0, 8])
    x = torch.randn(16, 32)
    ref = torch.autograd.grad(experts(x.requires_grad_(True), counts, kernel="loop").sum(), x)[0]
    for kernel in ("bmm", "grouped_mm"):
        got = torch.autograd.grad(experts(x, counts, kernel=kernel).sum(), x)[0]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_auto_kernel_choice():
    from moekit.moe.experts import choose_kernel

    experts = Experts(64, 32, 16)
    w_in, w_out = experts.w_in_EHD, experts.w_out_EDF
    one_hot = torch.zeros(64, dtype=torch.long)
    one_hot[3] = 2
    eight = torch.tensor([1] * 8 + [0] * 56)
    # training (the weights want gradients): padding decides
    assert choose_kernel(torch.randn(2, 32), w_in, w_out, one_hot) == "grouped_mm"  # 62 of 64 experts idle
    assert choose_kernel(torch.randn(8, 32), w_in, w_out, eight) == "grouped_mm"  # 8x padding
    assert choose_kernel(torch.randn(3200, 32), w_in, w_out, torch.full((64,), 50)) == "bmm"  # even: no padding
    skew = torch.full((64,), 50)
    skew[0] = 90  # padding 1.8x
    assert choose_kernel(torch.randn(3240, 32), w_in, w_out, skew) == "grouped_mm"
    assert choose_kernel(torch.randn(3200, 32), w_in, w_out) == "bmm"  # no counts: assume even
    assert choose_kernel(torch.randn(0, 32), w_in, w_out, torch.zeros(64, dtype=torch.long)) == "loop"
    # where grouped_mm cannot run (float64): bmm up to 8x padding, loop beyond
    w_in64, w_out64, x64 = w_in.double(), w_out.double(), torch.randn(2, 32, dtype=torch.float64)
    assert choose_kernel(x64, w_in64, w_out64, one_hot) == "loop"
    assert choose_kernel(x64, w_in64, w_out64, eight) == "bmm"
    # inference: one row per active expert reads only those experts (loop); more rows, one grouped call
    with torch.no_grad():
        assert choose_kernel(torch.randn(8, 32), w_in, w_out, eight) == "loop"
        assert choose_kernel(torch.randn(3200, 32), w_in, w_out, torch.full((64,), 50)) == "grouped_mm"


@pytest.mark.parametrize("kernel", KERNELS + ["loop"])
@pytest.mark.parametrize("mode", ["bf16-weights", "autocast"])
def test_layer_runs_in_bf16_on_cpu(kernel, mode):
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=32, num_experts=8, top_k=2, expert_hidden=16, kernel=kernel)
    layer = MoELayer(cfg)
    x = torch.randn(2, 30, 32)
    y_ref, _ = layer(x)
    if mode == "bf16-weights":
        layer = layer.to(torch.bfloat16)
        xi = x.to(torch.bfloat16).requires_grad_(True)
        y, routing = layer(xi)
    else:
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, routing = layer(xi)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert xi.grad is not None and torch.isfinite(xi.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    torch.testing.assert_close(y.float(), y_ref.detach(), atol=0.1, rtol=0.1)
