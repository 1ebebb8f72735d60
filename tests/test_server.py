"""moekit.server and `moekit serve`: the official openai client against the app, errors, batching, shutdown.

Oracles: `Engine.generate_ids` run on one prompt at a time (its own batch loop,
not the scheduler), the chat template / fallback format rendered by hand, and
the OpenAI wire format as the official `openai` client parses it.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from moekit.checkpoints import save_checkpoint  # noqa: E402
from moekit.config import to_dict  # noqa: E402
from moekit.infer import Engine, SamplingConfig  # noqa: E402
from moekit.server import ServerSettings, create_app  # noqa: E402
from moekit.server.generation import fallback_chat  # noqa: E402
from moekit.server.schemas import ChatCompletionRequest  # noqa: E402

from test_scheduler import tiny_engine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).parents[1]
NAME = "tiny"


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.fixture(scope="module")
def app(engine):
    app = create_app(engine, ServerSettings(model_name=NAME, max_batch=8, max_queue=32, max_tokens_limit=48))
    yield app
    app.state.server.shutdown()


def run(coro):
    return asyncio.run(coro)


def aclient(app, **kw):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key=kw.pop("api_key", "unused"), http_client=http,
                              max_retries=0, **kw), http


def alone(engine, prompt: str, max_tokens: int, **kw) -> str:
    return engine.generate_ids([engine.encode(prompt)], SamplingConfig(max_new_tokens=max_tokens, **kw))[0].text


# ---------------------------------------------------------------- every endpoint through the openai client


def test_openai_client_completions_and_models(app, engine):
    async def go():
        client, http = aclient(app)
        models = await client.models.list()
        assert [m.id for m in models.data] == [NAME]
        assert (await client.models.retrieve(NAME)).id == NAME
        r = await client.completions.create(model=NAME, prompt="def f(x):", max_tokens=12, temperature=0)
        assert r.object == "text_completion" and r.choices[0].text == alone(engine, "def f(x):", 12)
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == 9 and r.usage.completion_tokens == 12 and r.usage.total_tokens == 21
        two = await client.completions.create(model=NAME, prompt=["ab", "xyz"], max_tokens=5, temperature=0, n=2)
        assert [c.index for c in two.choices] == [0, 1, 2, 3]
        assert [c.text for c in two.choices] == [alone(engine, "ab", 5)] * 2 + [alone(engine, "xyz", 5)] * 2
        assert two.usage.prompt_tokens == 2 + 3
        ids = await client.completions.create(model=NAME, prompt=[104, 105], max_tokens=4, temperature=0)
        assert ids.choices[0].text == alone(engine, "hi", 4)
        health = await http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
    run(go())


def test_openai_client_chat_with_the_fallback_format_and_with_a_template(app, engine):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = "System: be brief\n\nUser: hi\n\nAssistant:"  # the documented fallback, by hand
    assert fallback_chat(ChatCompletionRequest(model=NAME, messages=messages).messages) == text

    async def go(a, expected_prompt):
        client, _ = aclient(a)
        r = await client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == len(engine.tokenizer.backend.encode(expected_prompt).ids)
        return r.choices[0].message.content

    content = run(go(app, text))
    ref = engine.generate_ids([engine.tokenizer.backend.encode(text).ids],
                              SamplingConfig(max_new_tokens=10, stop_strings=["\n\nUser:"]))[0].text
    assert content == ref
    templated = Engine(engine.model, engine.tokenizer, chat_template="{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    t_app = create_app(templated, ServerSettings(model_name=NAME))
    try:
        run(go(t_app, "<system>be brief<user>hi<assistant>"))
    finally:
        t_app.state.server.shutdown()


def test_streaming_gives_the_non_streamed_text_and_usage(app, engine):
    async def go():
        client, _ = aclient(app)
        stream = await client.completions.create(model=NAME, prompt="stream me", max_tokens=14, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == alone(engine, "stream me", 14)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 14
        chat = await client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "yo"}],
                                                    max_tokens=9, temperature=0, stream=True)
        chunks = [c async for c in chat]
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason
        assert all(c.usage is None for c in chunks)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        full = await client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "yo"}],
                                                    max_tokens=9, temperature=0)
        assert streamed == full.choices[0].message.content
    run(go())


def test_metrics_and_moe_stats(app):
    async def go():
        client, http = aclient(app)
        await client.completions.create(model=NAME, prompt="count", max_tokens=6, temperature=0)
        metrics = (await http.get("/metrics")).text
        for name in ("moekit_http_requests_total", "moekit_generated_tokens_total", "moekit_queue_depth",
                     "moekit_time_to_first_token_seconds_bucket", "moekit_inter_token_latency_seconds_bucket",
                     "moekit_batch_size_bucket", "moekit_generations_total"):
            assert name in metrics, name
        stats = (await http.get("/v1/moe/stats")).json()
        layers = stats["since_start"]["layers"]
        assert [row["layer"] for row in layers] == [0, 1] and all(len(row["load"]) == 4 for row in layers)
        assert all(row["tokens"] == sum(row["load"]) > 0 for row in layers)
        assert stats["recent"]["tokens"] > 0 and stats["offload"] is None
    run(go())


def test_moe_stats_report_offloading_counters():
    eng = tiny_engine()
    eng.offload("50%", tier="emulated", link_bandwidth="1GB/s")
    a = create_app(eng, ServerSettings(model_name=NAME))
    try:
        async def go():
            client, http = aclient(a)
            await client.completions.create(model=NAME, prompt="offloaded", max_tokens=6, temperature=0)
            return (await http.get("/v1/moe/stats")).json()["offload"]
        off = run(go())
        assert off["accesses"] > 0 and 0 <= off["cache_hit_rate"] <= 1 and off["bytes_moved"] > 0
        assert {"prefetch_precision", "prefetch_recall", "stall_s"} <= set(off)
    finally:
        a.state.server.shutdown()


# ---------------------------------------------------------------- errors


LONG = "x" * 40
C, CH = "/v1/completions", "/v1/chat/completions"
OK = {"model": NAME, "prompt": "hi", "max_tokens": 4}
OKC = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
MALFORMED = [
    (C, b"{bad", 400, None), (C, b"", 400, None), (C, b"[1, 2]", 400, None), (C, b"null", 400, None),
    (C, b"\xff\xfe\x00", 400, None), (C, b"[" * 50000, 400, None),
    (C, {"prompt": "x"}, 400, "model"), (C, {"model": NAME}, 400, "prompt"),
    (C, {**OK, "model": "gpt-4"}, 404, "model"),
    (C, {**OK, "max_tokens": 0}, 400, "max_tokens"), (C, {**OK, "max_tokens": -5}, 400, "max_tokens"),
    (C, {**OK, "max_tokens": "5"}, 400, "max_tokens"), (C, {**OK, "max_tokens": True}, 400, "max_tokens"),
    (C, {**OK, "max_tokens": 1.5}, 400, "max_tokens"), (C, {**OK, "max_tokens": 10**6}, 400, "max_tokens"),
    (C, {**OK, "prompt": LONG, "max_tokens": 40}, 400, "max_tokens"),
    (C, {**OK, "prompt": "y" * 70, "max_tokens": 1}, 400, "prompt"),
    (C, {**OK, "temperature": -1}, 400, "temperature"), (C, {**OK, "temperature": "hot"}, 400, "temperature"),
    (C, {**OK, "temperature": 2.5}, 400, "temperature"), (C, {**OK, "top_p": 0}, 400, "top_p"),
    (C, {**OK, "top_p": 1.5}, 400, "top_p"), (C, {**OK, "top_p": -0.1}, 400, "top_p"),
    (C, {**OK, "top_k": -2}, 400, "top_k"), (C, {**OK, "n": 0}, 400, "n"), (C, {**OK, "n": 100}, 400, "n"),
    (C, {**OK, "seed": -1}, 400, "seed"), (C, {**OK, "stop": 5}, 400, "stop"),
    (C, {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"), (C, {**OK, "stop": [""]}, 400, "stop"),
    (C, {**OK, "max_token": 5}, 400, "max_token"), (C, {**OK, "stream": "yes"}, 400, "stream"),
    (C, {**OK, "prompt": 123}, 400, "prompt"), (C, {**OK, "prompt": []}, 400, "prompt"),
    (C, {**OK, "prompt": [[1, 999]]}, 400, "prompt"), (C, {**OK, "prompt": ""}, 400, "prompt"),
    (C, {**OK, "logprobs": 5}, 400, "logprobs"), (C, {**OK, "echo": True}, 400, "echo"),
    (C, {**OK, "presence_penalty": 2.5}, 400, "presence_penalty"),
    (C, {**OK, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (C, {**OK, "stream": True, "stream_options": {"include_usage": "y"}}, 400, "stream_options.include_usage"),
    (C, {**OK, "temperature": float("nan")}, 400, "temperature"),
    (CH, {**OKC, "messages": []}, 400, "messages"), (CH, {"model": NAME}, 400, "messages"),
    (CH, {**OKC, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    (CH, {**OKC, "messages": "hi"}, 400, "messages"),
    (CH, {**OKC, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CH, {**OKC, "messages": [{"role": "user"}]}, 400, "messages[0].content"),  # issue 22: was answered 200
    (CH, {**OKC, "messages": [{"content": "x"}]}, 400, "messages[0].role"),
    (CH, {**OKC, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     "messages[0].content"),
    (CH, {**OKC, "max_tokens": 0}, 400, "max_tokens"),
    (CH, {**OKC, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    (CH, {**OKC, "tools": [{"type": "function"}]}, 400, "tools"),
    (CH, {**OKC, "model": "nope"}, 404, "model"),
    (CH, {**OKC, "messages": [{"role": "user", "content": LONG * 2}]}, 400, "messages"),
]


def test_malformed_requests_get_a_4xx_with_the_openai_envelope_naming_the_field(app):
    assert len(MALFORMED) >= 30

    async def go():
        _, http = aclient(app)
        for path, body, status, param in MALFORMED:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = await http.post(path, content=content, headers={"content-type": "application/json"})
            err = r.json()["error"]
            assert (r.status_code, err["param"]) == (status, param), (body if len(content) < 300 else path, r.text)
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            if param:
                assert param.split("[")[0].split(".")[0] in err["message"], err
        for method, path, status in (("GET", C, 405), ("POST", "/v1/nothing", 404), ("GET", "/v1/models/gpt-4", 404)):
            r = await http.request(method, path)
            assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert (await http.get("/health")).status_code == 200  # still alive
    run(go())


def test_api_key_is_required_on_v1_only(engine):
    a = create_app(engine, ServerSettings(model_name=NAME, api_key="sekret"))
    try:
        async def go():
            _, http = aclient(a)
            assert (await http.get("/v1/models")).status_code == 401
            wrong = await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
            r = await http.post(C, content=b"{bad")  # auth comes before the body is read
            assert r.status_code == 401
            assert (await http.get("/health")).status_code == 200
            client, _ = aclient(a, api_key="sekret")
            assert (await client.models.list()).data[0].id == NAME
            with pytest.raises(openai.AuthenticationError):
                await aclient(a, api_key="bad")[0].models.list()
        run(go())
    finally:
        a.state.server.shutdown()


def test_health_is_503_while_loading(engine):
    gate = threading.Event()

    def slow_loader():
        gate.wait(10)
        return engine

    a = create_app(slow_loader, ServerSettings(model_name=NAME))
    state = a.state.server
    async def go():
        _, http = aclient(a)
        assert (await http.get("/health")).status_code == 503  # lifespan not run: still loading
        r = await http.post(C, content=json.dumps(OK).encode())
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    run(go())
    gate.set()
    state.load(slow_loader)  # what the app's startup runs in a thread
    assert state.ready
    state.shutdown()

    def broken_loader():
        raise FileNotFoundError("no weights here")

    seen = []
    b = create_app(broken_loader, ServerSettings(model_name=NAME), on_load_error=seen.append)
    b.state.server.load(broken_loader)

    async def failed():
        _, http = aclient(b)
        r = await http.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "error" and "no weights here" in r.json()["error"]
        r = await http.post(C, content=json.dumps(OK).encode())
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]
    run(failed())
    assert len(seen) == 1 and isinstance(seen[0], FileNotFoundError)


def test_an_error_after_the_stream_started_is_a_final_chunk(engine):
    a = create_app(engine, ServerSettings(model_name=NAME))
    sched = a.state.server.scheduler
    real, calls = sched.model, []

    class Failing:
        cfg = real.cfg

        def __call__(self, *args, **kw):
            calls.append(1)
            if len(calls) == 12:  # prefill + 10 decode steps: some text has been streamed (greedy: the same steps every run)
                raise RuntimeError("boom")
            return real(*args, **kw)

    sched.model = Failing()
    try:
        async def go():
            _, http = aclient(a)
            r = await http.post(C, content=json.dumps({**OK, "max_tokens": 20, "stream": True, "temperature": 0}).encode())
            frames = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert frames[-1] == "[DONE]" and "boom" in json.loads(frames[-2])["error"]["message"]
            assert any("choices" in json.loads(f) for f in frames[:-2])  # it had started
            ok = await http.post(C, content=json.dumps({**OK, "temperature": 0}).encode())
            assert ok.status_code == 200  # the server survived
        run(go())
    finally:
        a.state.server.shutdown()


# ---------------------------------------------------------------- concurrency


def test_eight_simultaneous_streams_give_the_texts_each_gives_alone(app, engine):
    prompts = ["def f(x):", "a", "hello world", "the quick brown", "zz", "12345", "if x >", "q"]
    lengths = [6, 17, 9, 12, 3, 20, 8, 14]

    async def one(client, prompt, n):
        s = await client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in s if c.choices])

    async def go():
        client, _ = aclient(app)
        return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths)))

    got = run(go())
    assert got == [alone(engine, p, n) for p, n in zip(prompts, lengths)]


def test_a_seeded_request_gives_the_same_text_alone_and_in_a_batch(app):
    req = dict(model=NAME, prompt="sample", max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)

    async def go():
        client, _ = aclient(app)
        by_itself = (await client.completions.create(**req)).choices[0].text
        others = [client.completions.create(model=NAME, prompt=p, max_tokens=12, temperature=0.9, seed=i)
                  for i, p in enumerate(["x", "abc", "longer prompt"])]
        batch = await asyncio.gather(*others[:2], client.completions.create(**req), others[2])
        again = (await client.completions.create(**{**req, "seed": 1235})).choices[0].text
        return by_itself, batch[2].choices[0].text, again

    by_itself, in_batch, other_seed = run(go())
    assert by_itself == in_batch != other_seed


# ---------------------------------------------------------------- a live server: real sockets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live(engine):
    """The app under uvicorn in a thread, on a free loopback port, max_batch=1 and max_queue=1."""
    import uvicorn

    a = create_app(engine, ServerSettings(model_name=NAME, max_batch=1, max_queue=1))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(a, host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", a.state.server.scheduler
    server.should_exit = True
    t.join(10)


def wait_for(cond, timeout=20.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for the condition on line {cond.__code__.co_firstlineno}"
        time.sleep(0.01)


def test_a_client_that_disconnects_frees_its_slot_and_a_full_queue_is_429(live):
    url, sched = live
    real = sched.model

    class Slow:  # 250 ms a step: a 60-token request outlasts the test's steps, even on a loaded machine
        cfg = real.cfg

        def __call__(self, *args, **kw):
            time.sleep(0.25)
            return real(*args, **kw)

    sched.model = Slow()
    long = {**OK, "max_tokens": 60, "stream": True, "prompt": "a", "temperature": 0}  # greedy: no early EOS
    with httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", C, json=long) as r:
            next(r.iter_lines())
            wait_for(lambda: len(sched.rows) == 1)
        # the stream was closed after one line: its request is cancelled and the slot freed
        wait_for(lambda: not sched.rows)
        assert sched.stats.requests.get("cancelled") == 1
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        with http.stream("POST", C, json=long) as first:
            next(first.iter_lines())
            wait_for(lambda: len(sched.rows) == 1)
            with http.stream("POST", C, json=long) as second:  # waits in the queue (max_queue=1)
                wait_for(lambda: len(sched.waiting) == 1)
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model=NAME, prompt="hi", max_tokens=2)
                r = http.post(C, json=OK)
                assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
                second.close()
        wait_for(lambda: not sched.busy)
        assert client.completions.create(model=NAME, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, engine):
    from moekit.train.lm import RunConfig

    d = tmp_path_factory.mktemp("ckpt") / "run"
    save_checkpoint(d, 1, config=to_dict(RunConfig(model=engine.model.cfg)), model_state=engine.model.state_dict(),
                    optimizer_state=None, trainer_state={}, tokenizer=engine.tokenizer)
    return d


def test_moekit_serve_subprocess_over_a_real_socket_and_sigterm(checkpoint, engine):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOEKIT_API_KEY": "k1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "moekit", "serve", str(checkpoint), "--port", str(port),
                             "--model-name", NAME, "--max-batch", "4", "--shutdown-timeout", "5"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "moekit serve did not become healthy"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0, timeout=30)
        r = client.completions.create(model=NAME, prompt="hello", max_tokens=8, temperature=0)
        assert r.choices[0].text == alone(engine, "hello", 8)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", url + "/v1/completions", headers={"Authorization": "Bearer k1"},
                             json={**OK, "max_tokens": 30, "stream": True, "temperature": 0}) as s:
                lines = s.iter_lines()
                next(lines)
                proc.send_signal(signal.SIGTERM)  # in flight: it may finish within the shutdown timeout
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "model loaded" in out
