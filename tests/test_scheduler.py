"""moekit.infer.scheduler: continuous batching gives each request the tokens it gets alone.

The oracle is `Engine.generate` (its own one-shot batch loop) run on one
prompt at a time, plus a hand count of routed tokens for the MoE statistics.
"""

import pytest
import torch

from moekit.config import MoEConfig
from moekit.data.text import Tokenizer
from moekit.infer import Engine, SamplingConfig
from moekit.infer.scheduler import QueueFullError, Request, Scheduler
from moekit.models.decoder import DecoderLM, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_engine(max_seq_len=64, seed=0):
    torch.manual_seed(seed)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=24)
    model = DecoderLM(ModelConfig(vocab_size=257, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                  max_seq_len=max_seq_len, dense_hidden=40, moe=moe)).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init: fewer near-ties in greedy comparisons
        model.lm_head.weight.mul_(20)
    return Engine(model, Tokenizer.byte_level())


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def run_all(sched, prompts, cfgs, stagger=0):
    """Submit every prompt (one more every `stagger` steps when > 0) and run to the end."""
    done = {}
    texts = {i: "" for i in range(len(prompts))}

    def listener(i):
        def on_event(kind, payload):
            if kind == "token":
                texts[i] += payload[1]
            elif kind == "done":
                done[i] = payload
        return on_event

    requests = [Request(p, c, listener(i)) for i, (p, c) in enumerate(zip(prompts, cfgs))]
    for r in requests:
        sched.submit(r)
        for _ in range(stagger):
            sched.step()
    sched.run_until_idle()
    assert sorted(done) == list(range(len(prompts)))
    for i, c in done.items():
        assert texts[i] == c.text  # the streamed text adds up to the final text
    return [done[i] for i in range(len(prompts))]


def alone(engine, prompt, cfg):
    return engine.generate_ids([prompt], cfg)[0]


def test_greedy_batch_with_joins_and_leaves_equals_each_request_alone(engine):
    prompts = [engine.encode(t) for t in ["def f(x):", "a", "hello world", "the quick brown fox", "zz", "12345", "if x", "q"]]
    cfgs = [SamplingConfig(max_new_tokens=n) for n in (5, 17, 9, 12, 3, 20, 8, 14)]
    sched = Scheduler(engine, max_batch=3, max_queue=16)
    got = run_all(sched, prompts, cfgs, stagger=2)
    for p, c, g in zip(prompts, cfgs, got):
        ref = alone(engine, p, c)
        assert (g.token_ids, g.finish_reason, g.text) == (ref.token_ids, ref.finish_reason, ref.text)
    assert sched.cursor == 0 and not sched.rows  # everything left; the axis restarts


def test_requests_arriving_together_are_prefilled_in_one_pass_with_the_tokens_they_get_alone(engine):
    prompts = [engine.encode(t) for t in ["def f(x):", "a", "hello world", "zz", "12345"]]
    cfgs = [SamplingConfig(max_new_tokens=n) for n in (7, 12, 9, 3, 10)]
    sched = Scheduler(engine, max_batch=8)
    calls = []
    real = sched.model
    sched.model = type("Spy", (), {"cfg": real.cfg, "__call__": lambda self, ids, **kw: (calls.append(ids.shape), real(ids, **kw))[1]})()
    got = run_all(sched, prompts, cfgs)
    assert calls[0] == (5, 11)  # one left-padded prefill of all five prompts
    for p, c, g in zip(prompts, cfgs, got):
        assert g.token_ids == alone(engine, p, c).token_ids


def test_a_full_time_axis_is_compacted_without_changing_tokens(monkeypatch):
    engine = tiny_engine(max_seq_len=48)
    sched = Scheduler(engine, max_batch=3, max_queue=16)
    calls = []
    original = sched._compact
    monkeypatch.setattr(sched, "_compact", lambda min_cursor=0: (calls.append(min_cursor), original(min_cursor)))
    prompts = [[(7 * i + j) % 250 + 1 for j in range(10 + 3 * i)] for i in range(7)]
    cfgs = [SamplingConfig(max_new_tokens=30, stop_token_ids=[]) for _ in prompts]
    got = run_all(sched, prompts, cfgs, stagger=5)
    assert len(calls) >= 3  # the 48-column axis filled (and prompts arrived before the cursor) several times
    for p, c, g in zip(prompts, cfgs, got):
        assert g.token_ids == alone(engine, p, c).token_ids
    assert [g.finish_reason for g in got] == ["length"] * 7


def test_a_seeded_sampled_request_gives_the_same_tokens_alone_and_in_a_batch(engine):
    seeded = SamplingConfig(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=11)
    prompt = engine.encode("sample me")
    by_itself = run_all(Scheduler(engine, max_batch=4), [prompt], [seeded])[0]
    others = [SamplingConfig(max_new_tokens=15, temperature=0.8, seed=s) for s in (1, 2)] + [SamplingConfig(max_new_tokens=9)]
    batch = run_all(Scheduler(engine, max_batch=4), [engine.encode("x"), prompt, engine.encode("other"), [5, 6]],
                    [others[0], seeded, others[1], others[2]], stagger=1)
    assert batch[1].token_ids == by_itself.token_ids == alone(engine, prompt, seeded).token_ids
    other_seed = run_all(Scheduler(engine, max_batch=4), [prompt], [SamplingConfig(**{**seeded.__dict__, "seed": 12})])[0]
    assert other_seed.token_ids != by_itself.token_ids


def test_stop_strings_and_stop_ids_end_a_request_as_the_engine_does(engine):
    prompt = engine.encode("abc")
    free = alone(engine, prompt, SamplingConfig(max_new_tokens=24))
    cfgs = [SamplingConfig(max_new_tokens=24, stop_strings=[free.text[6:8]]),
            SamplingConfig(max_new_tokens=24, stop_token_ids=[free.token_ids[4]]),
            SamplingConfig(max_new_tokens=24)]
    got = run_all(Scheduler(engine, max_batch=3), [prompt] * 3, cfgs)
    for c, g in zip(cfgs, got):
        ref = alone(engine, prompt, c)
        assert (g.text, g.token_ids, g.finish_reason) == (ref.text, ref.token_ids, ref.finish_reason)
    assert got[0].finish_reason == got[1].finish_reason == "stop"


def test_cancel_frees_the_slot_for_a_waiting_request(engine):
    sched = Scheduler(engine, max_batch=1, max_queue=4)
    events = {"a": [], "b": []}
    a = sched.submit(Request([1, 2, 3], SamplingConfig(max_new_tokens=50, stop_token_ids=[]),
                             lambda k, p: events["a"].append(k)))
    b = sched.submit(Request([4, 5], SamplingConfig(max_new_tokens=3, stop_token_ids=[]),
                             lambda k, p: events["b"].append(k)))
    for _ in range(3):
        sched.step()
    assert [r.request for r in sched.rows] == [a] and list(sched.waiting) == [b]
    a.cancel()
    sched.step()
    assert a.finish_reason == "cancelled" and events["a"][-1] == "done"
    assert [r.request for r in sched.rows] == [b]
    sched.run_until_idle()
    assert b.finish_reason == "length" and events["b"].count("token") == 3


def test_a_full_queue_refuses_new_requests(engine):
    sched = Scheduler(engine, max_batch=1, max_queue=2)
    cfg = SamplingConfig(max_new_tokens=4)
    for _ in range(3):  # one for the free slot, two for the queue
        sched.submit(Request([1, 2], cfg))
    with pytest.raises(QueueFullError, match="queue is full"):
        sched.submit(Request([1, 2], cfg))
    sched.run_until_idle()
    sched.submit(Request([1, 2], cfg))  # room again


def test_the_background_thread_serves_requests_and_shuts_down(engine):
    import threading

    sched = Scheduler(engine, max_batch=2)
    sched.start()
    finished = threading.Event()
    results = []
    sched.submit(Request([1, 2, 3], SamplingConfig(max_new_tokens=6),
                         lambda k, p: (results.append(p), finished.set()) if k == "done" else None))
    assert finished.wait(30)
    assert results[0].token_ids == alone(engine, [1, 2, 3], SamplingConfig(max_new_tokens=6)).token_ids
    sched.shutdown(timeout=2)
    assert not sched._thread.is_alive()


def test_expert_load_counts_every_routed_token(engine):
    sched = Scheduler(engine, max_batch=2)
    prompts = [[1, 2, 3, 4], [5, 6]]
    got = run_all(sched, prompts, [SamplingConfig(max_new_tokens=6, stop_token_ids=[])] * 2)
    fed = sum(len(p) + len(g.token_ids) - 1 for p, g in zip(prompts, got))  # the last sampled token is never fed
    report = sched.stats.moe_report()
    layers = report["since_start"]["layers"]
    assert [row["layer"] for row in layers] == [0, 1]
    assert all(sum(row["load"]) == 2 * fed for row in layers)  # top-2 routing: two assignments per token
    assert report["recent"]["tokens"] == fed and report["offload"] is None
