"""Serving with known routes: a Read-ME model through Engine.load, lookahead caching, expert-aware continuous batching.

Oracles: ReadMeLM's own full forward (greedy, the whole sequence recomputed every token), the resident
engine's tokens for the offloaded one, and each request generated alone for the batched scheduler.
"""

import math

import pytest
import torch

from moekit import moefy
from moekit.infer import Engine, SamplingConfig
from moekit.infer.scheduler import Request, Scheduler
from moekit.moefy.readme_lm import make_readme_lm

from test_moefy_convert import dense_lm

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[3, 7, 11, 20, 40], [1, 2], [45, 44, 43, 10, 9, 8, 7], [30], [12, 13, 14], [25, 26, 27, 28], [5, 49], [33, 22, 11, 0]]


@pytest.fixture(scope="module")
def readme_dir(tmp_path_factory):
    torch.manual_seed(0)
    dense = dense_lm()
    calib = [torch.randint(0, 25, (4, 32)), torch.randint(25, 50, (4, 32))]
    moe = moefy.convert(dense, method="readme", experts=4, top_k=1, shared_fraction=0.25, calib=calib, router="decoupled")
    model = make_readme_lm(moe, {"hidden_size": 32}).eval()
    return moefy.save(model, tmp_path_factory.mktemp("routes") / "readme")


@torch.no_grad()
def full_forward_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_engine_loads_a_read_me_model_and_generates_its_own_greedy_tokens(readme_dir):
    engine = Engine.load(readme_dir)
    assert callable(engine.model.route_ahead)  # the capability the scheduler uses
    oracle = moefy.load(readme_dir)
    for prompt in PROMPTS[:3]:
        got = engine.generate_ids([prompt], SamplingConfig(max_new_tokens=20))[0].token_ids
        assert got == full_forward_greedy(oracle, prompt, 20)


def test_a_left_padded_batch_generates_each_prompt_its_solo_tokens(readme_dir):
    """The decoupled router gets the engine's padding mask and per-row positions, as the LM does."""
    engine = Engine.load(readme_dir)
    oracle = moefy.load(readme_dir)
    prompts = [PROMPTS[2], PROMPTS[1], PROMPTS[0]]  # 7, 2 and 5 tokens: two rows left-padded
    cfg = SamplingConfig(max_new_tokens=12)
    got = [r.token_ids for r in engine.generate_ids(prompts, cfg)]
    assert got == [engine.generate_ids([p], cfg)[0].token_ids for p in prompts]
    assert got == [full_forward_greedy(oracle, p, 12) for p in prompts]


@pytest.mark.parametrize("policy,predictor", [("lookahead", "lookahead"), ("lookahead", "none"), ("lru", "lookahead")])
def test_offloaded_read_me_generation_equals_resident(readme_dir, policy, predictor):
    resident = Engine.load(readme_dir)
    engine = Engine.load(readme_dir, expert_budget="50%", policy=policy, predictor=predictor)
    assert engine.offloader.tier.kind == "disk"  # loaded without its experts: they come from the saved file
    cfg = SamplingConfig(max_new_tokens=16)
    for prompt in PROMPTS[:3]:
        assert engine.generate_ids([prompt], cfg)[0].token_ids == resident.generate_ids([prompt], cfg)[0].token_ids
    stats = engine.offloader.stats()
    assert stats["policy"] == policy and stats["misses"] > 0
    if predictor == "lookahead":  # layer i+1 uses layer i's expert: every prefetch is used
        assert stats["prefetches"] > 0 and stats["prefetch_used"] == stats["prefetches"]
    engine.offloader.close()


def serve(engine, prompts, cfg, **options):
    """Run every prompt through one Scheduler; (tokens per request, decode steps at which each token came)."""
    sched = Scheduler(engine, max_batch=len(prompts), **options)
    tokens, steps = {}, {i: [] for i in range(len(prompts))}

    def listener(i):
        def on_event(kind, payload):
            if kind == "token" and payload[0] is not None:
                steps[i].append(sched.now)
            elif kind == "done":
                tokens[i] = payload.token_ids
        return on_event

    for i, p in enumerate(prompts):
        sched.submit(Request(p, cfg, listener(i)))
    sched.run_until_idle()
    assert sorted(tokens) == list(range(len(prompts)))  # every request finished
    return [tokens[i] for i in range(len(prompts))], steps


@pytest.mark.parametrize("batching", ["expert", "fifo"])
def test_batching_by_expert_gives_each_request_its_solo_tokens_and_starves_none(readme_dir, batching):
    engine = Engine.load(readme_dir)
    cfg = SamplingConfig(max_new_tokens=14)
    solo = [engine.generate_ids([p], cfg)[0].token_ids for p in PROMPTS]
    step_tokens, max_wait = 3, 2
    got, steps = serve(engine, PROMPTS, cfg, step_tokens=step_tokens, max_wait=max_wait, batching=batching)
    assert got == solo
    bound = max_wait + math.ceil(len(PROMPTS) / step_tokens) + 1  # steps between two tokens of one request
    gaps = [b - a for s in steps.values() for a, b in zip(s, s[1:])]
    assert max(gaps) <= bound and max(gaps) > 1  # subsets decoded, within the aging bound


def test_expert_aware_steps_touch_fewer_experts_than_fifo_and_lookahead_loads_fewer_than_lru(readme_dir):
    cfg = SamplingConfig(max_new_tokens=14)
    loads, touched = {}, {}
    resident = Engine.load(readme_dir)
    solo = [resident.generate_ids([p], cfg)[0].token_ids for p in PROMPTS]
    for batching in ("fifo", "expert"):
        for policy, predictor in (("lru", "none"), ("lookahead", "lookahead")):
            engine = Engine.load(readme_dir)
            engine.offload("25%", policy=policy, predictor=predictor, tier="memory")
            got, _ = serve(engine, PROMPTS, cfg, step_tokens=3, max_wait=4, batching=batching)
            assert got == solo  # offloaded and batched by expert: still each request's own tokens
            stats = engine.offloader.stats()
            loads[batching, policy] = stats["transfers"]
            trace = engine.offloader.trace.steps[0]  # layer 0's experts per step (prefills included)
            touched[batching, policy] = sum(map(len, trace)) / len(trace)
            engine.offloader.close()
    assert touched["expert", "lru"] < touched["fifo", "lru"]
    assert loads["expert", "lru"] < loads["fifo", "lru"]
    for batching in ("fifo", "expert"):
        assert loads[batching, "lookahead"] <= loads[batching, "lru"]


def test_a_plain_model_batches_fifo_subsets_with_its_solo_tokens():
    from test_scheduler import tiny_engine

    engine = tiny_engine()
    assert getattr(engine.model, "route_ahead", None) is None
    cfg = SamplingConfig(max_new_tokens=10)
    prompts = [[5 + i, 9, 30 + 2 * i] for i in range(6)]
    solo = [engine.generate_ids([p], cfg)[0].token_ids for p in prompts]
    got, steps = serve(engine, prompts, cfg, step_tokens=2)
    assert got == solo
    assert max(b - a for s in steps.values() for a, b in zip(s, s[1:])) == 3  # round robin: 6 rows, 2 per step


def byte_level_readme(path, seed=0):
    """A Read-ME model over bytes (vocab 257) saved with the byte-level tokenizer."""
    from moekit.config import MoEConfig
    from moekit.data.text import Tokenizer
    from moekit.models.build import build_model
    from moekit.models.decoder import ModelConfig

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=257, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64,
                      ffn="dense", dense_hidden=64, moe=MoEConfig(num_experts=2, top_k=1, expert_hidden=8))
    dense = build_model(cfg).eval()
    for p in dense.parameters():
        p.data.normal_(0, 0.3) if p.dim() > 1 else None
    calib = [torch.randint(97, 123, (4, 32)), torch.randint(32, 64, (4, 32))]
    moe = moefy.convert(dense, method="readme", experts=4, top_k=1, shared_fraction=0.25, calib=calib, router="decoupled")
    tok_dir = path.parent / "tok"
    tok_dir.mkdir(exist_ok=True)
    Tokenizer.byte_level().save(tok_dir)
    return moefy.save(make_readme_lm(moe, {"hidden_size": 32}).eval(), path, source=tok_dir)


def test_generate_cli_with_lookahead_caching_prints_the_resident_text(tmp_path, capsys):
    from moekit.cli.main import main

    d = byte_level_readme(tmp_path / "readme")
    want = Engine.load(d).generate("hello", max_new_tokens=8)[0].text
    assert main(["generate", str(d), "--prompt", "hello", "--max-new-tokens", "8", "--expert-budget", "50%",
                 "--cache", "lookahead", "--prefetch", "lookahead"]) == 0
    assert want in capsys.readouterr().out and want


def test_the_server_batching_by_expert_streams_each_request_its_solo_text(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("openai")
    import asyncio

    from moekit.server import ServerSettings, create_app
    from test_server import aclient, alone

    d = byte_level_readme(tmp_path / "readme")
    engine = Engine.load(d, expert_budget="50%", policy="lookahead", predictor="lookahead")  # lazily: experts on disk
    app = create_app(engine, ServerSettings(model_name="tiny", max_batch=8, step_tokens=3, max_wait=2))
    prompts = ["def f(x):", "a", "hello world", "the quick brown", "zz", "12345", "if x >", "q"]
    lengths = [6, 17, 9, 12, 3, 20, 8, 14]

    async def one(client, prompt, n):
        s = await client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in s if c.choices])

    async def go():
        client, _ = aclient(app)
        return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths)))

    try:
        got = asyncio.run(go())
        resident = Engine.load(d)
        assert got == [alone(resident, p, n) for p, n in zip(prompts, lengths)]
        assert app.state.server.scheduler.now > 0
    finally:
        app.state.server.shutdown()


def test_engine_loads_other_converted_decoders_and_refuses_encoders(tmp_path):
    torch.manual_seed(1)
    calib = [torch.randint(0, 50, (4, 32))]
    moe = moefy.convert(dense_lm(), method="cluster", experts=4, top_k=2, calib=calib).eval()
    d = moefy.save(moe, tmp_path / "cluster")
    engine = Engine.load(d)
    assert getattr(engine.model, "route_ahead", None) is None  # per-layer routers: no routes known ahead
    got = engine.generate_ids([[3, 9, 27]], SamplingConfig(max_new_tokens=10))[0].token_ids
    assert got == full_forward_greedy(moe, [3, 9, 27], 10)
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "moefy.json").write_text('{"kind": "encoder"}')
    with pytest.raises(moefy.MoefyError, match="does not generate text"):
        Engine.load(tmp_path / "enc")
