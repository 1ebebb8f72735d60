"""Every family the engine loads, through the continuous-batching scheduler: N requests at once == each alone.

Families: Mixtral and Qwen2-MoE (grouped-query attention), DeepSeek-V2 and V3 (MLA's latent cache, group-limited
routing), GPT-OSS (sliding window, sinks), Granite-MoE, PhiMoE (tiny random transformers models, saved and read
by moekit.hf), Mixture-of-Depths (the cache's depth history), MoMa (expert choice by modality ranges + MoD),
Read-ME known routes (a router cache per row, expert-aware subset decoding) and task routing (a group id per
request). Four requests of different prompt lengths go in at once with max_batch=3: three are prefilled
together (left-padded), the fourth joins when the first leaves (its row is refilled by the last one, and its
longer prompt makes the scheduler compact the time axis).

Oracle: `Engine.generate_ids` on one prompt alone (its own one-shot loop, no scheduler), greedy.
For DeepSeek-V3 (MLA), MoD and task routing the same requests also go through the real HTTP app
(httpx against the ASGI app, as tests/test_server.py does): the texts equal each request's text alone.
"""

import asyncio
import json

import pytest
import torch

pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from moekit import hf, moefy  # noqa: E402
from moekit.config import MoEConfig  # noqa: E402
from moekit.data.text import Tokenizer  # noqa: E402
from moekit.infer import Engine, SamplingConfig  # noqa: E402
from moekit.infer.scheduler import Request, Scheduler  # noqa: E402
from moekit.models.decoder import DecoderLM, ModelConfig  # noqa: E402
from moekit.moefy.readme_lm import make_readme_lm  # noqa: E402
from moekit.server import ServerSettings, create_app  # noqa: E402

import test_hf  # noqa: E402
import test_hf_deepseek  # noqa: E402
import test_hf_families2  # noqa: E402
from test_moefy_convert import dense_lm  # noqa: E402
from test_moma import moma_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [14, 15, 16], [20, 21, 22, 23, 24, 25],
           [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42]]
NEW = [4, 7, 5, 6]  # the first leaves after 3 decode steps (cursor 12): the 13-token prompt needs a compaction
TASKS = [1, 4, 0, 2]


def _hf(module, family):
    def build(tmp_path):
        ref = module.build_hf(family)
        ref.save_pretrained(tmp_path)
        return hf.load(tmp_path)
    return build


def _mod(tmp_path):
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=24)
    return DecoderLM(ModelConfig(vocab_size=257, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                                 max_seq_len=64, dense_hidden=40, moe=moe, mod_layers=[1, 2], mod_capacity=0.5))


def _task(tmp_path):
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=24, router="task", num_groups=5)
    return DecoderLM(ModelConfig(vocab_size=257, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 max_seq_len=64, dense_hidden=40, moe=moe))


def _readme(tmp_path):
    torch.manual_seed(0)
    calib = [torch.randint(0, 25, (4, 32)), torch.randint(25, 50, (4, 32))]
    moe = moefy.convert(dense_lm(), method="readme", experts=4, top_k=1, shared_fraction=0.25, calib=calib,
                        router="decoupled")
    return make_readme_lm(moe, {"hidden_size": 32})


FAMILIES = {
    "mixtral": _hf(test_hf, "mixtral"),
    "qwen2_moe": _hf(test_hf, "qwen2_moe"),
    "deepseek_v2": _hf(test_hf_deepseek, "deepseek_v2"),
    "deepseek_v3": _hf(test_hf_deepseek, "deepseek_v3"),
    "gpt_oss": _hf(test_hf_families2, "gpt_oss"),
    "granitemoe": _hf(test_hf_families2, "granitemoe"),
    "phimoe": _hf(test_hf_families2, "phimoe"),
    "mixture_of_depths": _mod,
    "moma": lambda tmp_path: moma_model(mod_layers=[1], mod_capacity=0.5),
    "readme_known_routes": _readme,
    "task_routing": _task,
}
GROUPED = {"task_routing"}  # families whose requests carry a group id (TASKS)


def engine_for(family, tmp_path):
    model = FAMILIES[family](tmp_path).eval()
    lm = getattr(model, "lm", model)
    with torch.no_grad():  # sharper logits than a random init's: no near-ties in the greedy comparisons
        lm.lm_head.weight.mul_(8)
    return Engine(model, Tokenizer.byte_level())


def alone(engine, i, group):
    cfg = SamplingConfig(max_new_tokens=NEW[i], stop_token_ids=[])
    return engine.generate_ids([PROMPTS[i]], cfg, group_ids=None if group is None else [group])[0]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_engine(request, tmp_path_factory):
    return request.param, engine_for(request.param, tmp_path_factory.mktemp(request.param))


def test_concurrent_requests_through_the_scheduler_get_their_solo_tokens(family_engine):
    family, engine = family_engine
    groups = TASKS if family in GROUPED else [None] * 4
    events = {i: [] for i in range(4)}
    step_tokens = 2 if family == "readme_known_routes" else None  # known routes: two of three rows decode per step
    sched = Scheduler(engine, max_batch=3, step_tokens=step_tokens)
    for i, p in enumerate(PROMPTS):
        cfg = SamplingConfig(max_new_tokens=NEW[i], stop_token_ids=[])
        sched.submit(Request(list(p), cfg, lambda kind, payload, i=i: events[i].append((kind, payload)), group_id=groups[i]))
    compactions = []
    real = sched._compact
    sched._compact = lambda *a, **kw: (compactions.append(1), real(*a, **kw))[1]
    sched.run_until_idle()
    for i in range(4):
        kinds = [k for k, _ in events[i]]
        assert kinds.count("done") == 1 and "error" not in kinds, (family, i, events[i][-1])
        got = events[i][-1][1]
        want = alone(engine, i, groups[i])
        assert (got.token_ids, got.finish_reason) == (want.token_ids, want.finish_reason), (family, i)
    assert compactions and not sched.rows and sched.cursor == 0  # the fourth prompt made room by compacting


def test_a_sliding_window_model_decoding_a_subset_per_step_gets_its_solo_tokens(tmp_path):
    """step_tokens < rows: a row that sits out a step has a gap in its columns, which a window must not count."""
    engine = engine_for("gpt_oss", tmp_path)
    cfg = SamplingConfig(max_new_tokens=12, stop_token_ids=[])
    done = {}
    sched = Scheduler(engine, max_batch=4, step_tokens=2)
    for i, p in enumerate(PROMPTS):
        sched.submit(Request(list(p), cfg, lambda kind, payload, i=i: done.update({i: payload}) if kind == "done" else None))
    sched.run_until_idle()
    assert [done[i].token_ids for i in range(4)] == [engine.generate_ids([p], cfg)[0].token_ids for p in PROMPTS]


def _post_all(app, bodies, stream=False):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return await asyncio.gather(*(http.post("/v1/completions", json={**b, "stream": stream}) for b in bodies))
    return asyncio.run(go())


def _stream_text(r):
    frames = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert all("error" not in f for f in frames), frames
    return "".join(f["choices"][0]["text"] for f in frames if f.get("choices"))


@pytest.mark.parametrize("family", ["deepseek_v3", "mixture_of_depths", "task_routing"])
def test_concurrent_requests_through_the_http_server_get_their_solo_texts(family, tmp_path):
    engine = engine_for(family, tmp_path)
    groups = TASKS if family in GROUPED else [None] * 4
    app = create_app(engine, ServerSettings(model_name="m", max_batch=3))
    try:
        bodies = [{"model": "m", "prompt": p, "max_tokens": n, "temperature": 0,
                   **({"group_id": g} if g is not None else {})} for p, n, g in zip(PROMPTS, NEW, groups)]
        want = [engine.generate_ids([p], SamplingConfig(max_new_tokens=n), group_ids=None if g is None else [g])[0]
                for p, n, g in zip(PROMPTS, NEW, groups)]
        for r, w in zip(_post_all(app, bodies), want):
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert (choice["text"], choice["finish_reason"]) == (w.text, w.finish_reason)
            assert r.json()["usage"]["completion_tokens"] == len(w.token_ids)
        for r, w in zip(_post_all(app, bodies, stream=True), want):
            assert r.status_code == 200 and _stream_text(r) == w.text
    finally:
        app.state.server.shutdown()


def test_group_id_is_checked_against_the_model_with_a_400_naming_it(tmp_path):
    task = create_app(engine_for("task_routing", tmp_path), ServerSettings(model_name="m"))
    plain = create_app(engine_for("mixture_of_depths", tmp_path), ServerSettings(model_name="m"))
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 2}
    try:
        missing, over, negative, text = _post_all(task, [body, {**body, "group_id": 5}, {**body, "group_id": -1},
                                                         {**body, "group_id": "1"}])
        (unwanted,) = _post_all(plain, [{**body, "group_id": 0}])
        for r, words in [(missing, "group_id is required"), (over, r"in [0, 5)"), (unwanted, "does not route by group")]:
            assert r.status_code == 400 and r.json()["error"]["param"] == "group_id" and words in r.json()["error"]["message"]
        for r in (negative, text):  # the schema's own checks
            assert r.status_code == 400 and r.json()["error"]["param"] == "group_id"
    finally:
        task.state.server.shutdown()
        plain.state.server.shutdown()
