"""Predictors and background transfers: what each predictor names, exact prediction on a pre-gated model,
prefetching hides transfer time behind computation, transfer errors surface, bad input."""

import time

import pytest
import torch

from moekit.errors import MoekitError
from moekit.infer.engine import Engine
from moekit.infer.offload import EmulatedLinkTier, MemoryTier, find_moe_layers
from moekit.infer.prefetch import (
    DONE, PREDICTORS, CudaTransferQueue, NextGate, OraclePredictor, PrefetchAll, ThreadTransferQueue, build_predictor,
    rank_assignments,
)
from moekit.infer.sampling import SamplingConfig
from moekit.train.pregate import apply_pregated_routing

from test_offload import tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


def greedy(engine, prompt, n):
    cfg = SamplingConfig(max_new_tokens=n, temperature=0, stop_token_ids=[])
    return engine.generate_ids([prompt], cfg)[0].token_ids


def test_rank_assignments_orders_by_total_weight():
    idx = torch.tensor([3, 1, 3, 5])
    w = torch.tensor([0.2, 0.5, 0.4, 0.1])
    assert rank_assignments(idx, w, 8) == [3, 1, 5]
    big_idx = torch.arange(40) % 7
    assert rank_assignments(big_idx, torch.ones(40), 7) == [0, 1, 2, 3, 4, 5, 6]


def test_next_gate_is_the_next_router_on_this_input():
    model = tiny_model(0)
    layers = [m for _, m in find_moe_layers(model)]
    pred = NextGate()
    pred.bind(layers, [[0] * 8 for _ in layers])
    x = torch.randn(1, 32)
    idx_TK, _ = layers[1].router.select(x)
    assert set(pred.predict(0, x)) == set(idx_TK[0].tolist())
    assert pred.predict(len(layers) - 1, x) is None  # nothing after the last layer
    everything = PrefetchAll()
    usage = [[0] * 8 for _ in layers]
    usage[1][5] = 3
    everything.bind(layers, usage)
    assert everything.predict(0, x)[:2] == [5, 0] and len(everything.predict(0, x)) == 8


def test_pregated_model_makes_next_gate_exact():
    """On a pre-gated model layer i+1 routes on layer i's input, so next-gate predicts it with no mistakes."""
    model = tiny_model(1)
    apply_pregated_routing(model)
    engine = Engine(model)
    want = greedy(engine, [7], 10)
    offloader = engine.offload("50%", tier="memory", predictor="next-gate")
    assert greedy(engine, [7], 10) == want
    stats = offloader.stats()
    assert stats["prefetch_precision"] == 1.0 and stats["prefetch_recall"] == 1.0
    layers = stats["layers"]
    assert layers[0]["predicted"] == 0  # the first MoE layer has nothing before it
    assert all(l["misses"] == l["predicted"] - l["predicted_correct"] == 0 for l in layers[1:])
    offloader.close()


def test_prefetching_hides_transfer_time_behind_computation():
    """A slow emulated link and a slow attention: on-demand stalls for every miss, exact prefetch hardly at all."""
    model = tiny_model(2)
    apply_pregated_routing(model)  # exact prediction: the difference is the overlap, not the predictor
    for layer in model.layers:
        layer.self_attn.register_forward_hook(lambda *args: time.sleep(0.006))
    weights = [(m.experts.w_in_EHD.detach().clone(), m.experts.w_out_EDF.detach().clone()) for _, m in find_moe_layers(model)]
    engine = Engine(model)
    want = greedy(engine, [3], 8)
    per_expert = weights[0][0][0].numel() * 4 + weights[0][1][0].numel() * 4
    tier = EmulatedLinkTier(MemoryTier(weights), bandwidth=per_expert / 0.002, latency="0")  # 2 ms per expert
    offloader = engine.offload("25%", tier=tier, predictor="none")
    assert greedy(engine, [3], 8) == want
    on_demand = offloader.stats()
    offloader.configure("25%", "lru", "next-gate")
    assert greedy(engine, [3], 8) == want
    prefetched = offloader.stats()
    assert on_demand["misses"] > 0 and on_demand["stall_s"] > 0.002 * on_demand["misses"] * 0.5
    assert prefetched["misses"] < on_demand["misses"]

    def predicted_layers_stall(stats):  # the first MoE layer has nothing before it to be predicted from
        return sum(layer["stall_s"] for layer in stats["layers"][1:])

    assert predicted_layers_stall(prefetched) < 0.25 * predicted_layers_stall(on_demand), (prefetched, on_demand)
    offloader.close()


def test_thread_queue_runs_in_order_and_reports_errors():
    queue = ThreadTransferQueue()
    seen = []
    transfers = [queue.submit(0, lambda i=i: (time.sleep(0.001), seen.append(i))) for i in range(5)]
    transfers[-1].wait()  # one link, in order: when the last is done, all are
    assert seen == [0, 1, 2, 3, 4] and all(t.done() for t in transfers)

    def fail():
        raise OSError("read failed")

    bad = queue.submit(0, fail)
    with pytest.raises(OSError, match="read failed"):
        bad.wait()
    with pytest.raises(OSError, match="read failed"):  # remembered: every later use fails too
        queue.submit(0, lambda: None)
    queue.close()
    assert DONE.wait() == 0.0 and DONE.done()


def test_emulated_link_stalls_on_demand_for_the_modelled_time_and_prefetch_ahead_hides_it():
    """Oracle: the link model itself, latency + bytes / bandwidth, computed here by hand (2 ms + 1 MB / 100 MB/s = 12 ms)."""
    link = EmulatedLinkTier(MemoryTier([]), bandwidth="100MB/s", latency="2ms")
    cost = link.cost(1_000_000)
    assert cost == pytest.approx(0.002 + 1_000_000 / 100e6)
    queue = ThreadTransferQueue()
    on_demand = []
    for _ in range(3):  # the gate fired: fetch and wait right away
        on_demand.append(queue.submit(0, lambda: None, urgent=True, cost=cost).wait())
    assert min(on_demand) >= cost - 1e-3, (on_demand, cost)
    ahead = []
    for _ in range(3):  # prefetched one layer ahead, then 1.5 transfer-times of computation before it is needed
        t = queue.submit(0, lambda: None, cost=cost)
        time.sleep(1.5 * cost)
        ahead.append(t.wait())
    assert max(ahead) < 0.25 * min(on_demand), (ahead, on_demand)
    # A serial link: the second of two transfers submitted together ends no sooner than two transfer-times later.
    start = time.perf_counter()
    first, second = (queue.submit(0, lambda: None, urgent=True, cost=cost) for _ in range(2))
    first.wait()
    second.wait()
    assert time.perf_counter() - start >= 2 * cost - 1e-3
    queue.close()


def test_oracle_predicts_the_recorded_generation_exactly():
    """The oracle replays a trace recorded with prediction off; its precision and recall are 1 on that generation."""
    model = tiny_model(3)
    engine = Engine(model)
    want = greedy(engine, [5, 6, 7], 10)
    offloader = engine.offload("100%", tier="memory", predictor="none")
    assert greedy(engine, [5, 6, 7], 10) == want
    trace = offloader.trace
    assert len(trace.steps) == len(find_moe_layers(model)) and len(trace.steps[0]) == 10  # prefill + 9 decode steps
    oracle = OraclePredictor(trace)
    offloader.configure("100%", "lru", oracle)  # slots for every expert: the prefill's union is not cut to fit
    assert greedy(engine, [5, 6, 7], 10) == want
    stats = offloader.stats()
    assert stats["predictor"] == "oracle" and stats["predicted"] > 0
    assert stats["prefetch_precision"] == 1.0 and stats["prefetch_recall"] == 1.0
    # every step but the very first (prefill of layer 0) was predicted, each with exactly its routed experts
    per_layer = stats["layers"]
    assert per_layer[0]["predicted"] == sum(len(s) for s in trace.steps[0][1:])
    assert all(l["predicted"] == sum(len(s) for s in steps) for l, steps in zip(per_layer[1:], trace.steps[1:]))
    # by name, with the trace, beside Belady; at 25% the prefill's prediction is cut to the slots (recall < 1 there)
    offloader.configure("25%", "belady", build_predictor("oracle", trace=trace), trace=trace)
    assert greedy(engine, [5, 6, 7], 10) == want and offloader.stats()["prefetch_precision"] == 1.0
    # without a trace, or on another generation, it is refused
    offloader.configure("25%", "lru", OraclePredictor(trace))
    with pytest.raises(MoekitError, match="routing trace for the oracle does not match this generation"):
        greedy(engine, [9, 9, 9, 9, 9, 9], 10)
    offloader.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copy_stream_orders_copies_and_compute():
    queue = CudaTransferQueue("cuda")
    src = torch.randn(1 << 20).pin_memory()
    dst = torch.empty(1 << 20, device="cuda")
    t = queue.submit(0, lambda: dst.copy_(src, non_blocking=True))
    t.wait()
    assert torch.equal(dst.cpu(), src)
    queue.layer_done(0)
    assert queue.stall_seconds() >= 0


def test_unknown_or_incomplete_predictors_are_named():
    with pytest.raises(MoekitError, match="unknown predictor 'psychic': accepted predictors are none, prefetch-all, next-gate, pregate, oracle, lookahead"):
        build_predictor("psychic")
    with pytest.raises(MoekitError, match="moekit pregate"):
        build_predictor("pregate")
    with pytest.raises(MoekitError, match="the oracle predictor needs a routing trace"):
        build_predictor("oracle")
    assert PREDICTORS == ("none", "prefetch-all", "next-gate", "pregate", "oracle", "lookahead")
