"""moekit.server: requests no field accepts, requests that never fit, bodies cut short, sizes, penalties.

Oracles: the OpenAI error envelope (status, param, a message naming the field), and for the penalties
`Engine.generate_ids` run alone (its own loop, not the scheduler) with the same SamplingConfig.
"""

import asyncio
import json
import logging

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from moekit.server import ServerSettings, create_app  # noqa: E402

from test_scheduler import tiny_engine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "tiny"
C, CH = "/v1/completions", "/v1/chat/completions"
OK = {"model": NAME, "prompt": "hi", "max_tokens": 4}
OKC = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.fixture(scope="module")
def app(engine):
    app = create_app(engine, ServerSettings(model_name=NAME, max_batch=8, max_queue=32, max_tokens_limit=48))
    yield app
    app.state.server.shutdown()


def post_all(app, requests):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            out = []
            for path, content in requests:
                out.append(await http.post(path, content=content, headers={"content-type": "application/json"}))
            return out
    return asyncio.run(go())


def raw(body: dict) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: a lone surrogate goes out as the escape \ud800


BAD = [
    (C, raw({**OK, "prompt": "ab\ud800c"}), "prompt"),
    (C, raw({**OK, "prompt": ["fine", "\udfff"]}), "prompt[1]"),
    (C, raw({**OK, "stop": ["\ud800"]}), "stop[0]"),
    (CH, raw({**OKC, "messages": [{"role": "user", "content": "x\ud800"}]}), "messages[0].content"),
    (CH, raw({**OKC, "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}),
     "messages[0].content[0].text"),
    (C, b'{"model": "tiny", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "seed"),
    (C, b'{"model": "tiny", "prompt": "hi", "max_tokens": -' + b"1" * 5000 + b"}", "max_tokens"),
    (CH, b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": ' + b"1" * 4400 + b"}", "seed"),
]


def test_lone_surrogates_and_huge_integers_are_400_naming_the_field(app):
    responses = post_all(app, [(path, body) for path, body, _ in BAD])
    for (path, body, param), r in zip(BAD, responses):
        assert r.status_code == 400, (path, body[:80], r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["code"] == "invalid_value", err
        assert param.split("[")[0].split(".")[0] in err["message"]
    fine = post_all(app, [(C, raw({**OK, "prompt": "emoji \U0001F600", "seed": 12345678901234567890 // 10}))])[0]
    assert fine.status_code == 200, fine.text  # a surrogate pair (escaped by json.dumps) is fine


def test_a_request_that_can_never_fit_the_queue_is_400_naming_the_limit(app):
    # capacity: max_batch 8 + max_queue 32 = 40 choices at once
    many = raw({**OK, "prompt": [f"p{i}" for i in range(200)]})
    wide = raw({**OK, "prompt": [f"p{i}" for i in range(16)], "n": 16})
    chat = raw({**OKC, "n": 16})
    r_many, r_wide, r_fits = post_all(app, [(C, many), (C, wide), (CH, chat)])
    for r, param in ((r_many, "prompt"), (r_wide, "n")):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["code"] == "too_many_choices"
        assert "40" in err["message"] and "max_queue" in err["message"]
    assert r_fits.status_code == 200, r_fits.text


# ---------------------------------------------------------------- sizes, bodies cut short, the real port


class _CountingBackend:
    def __init__(self, backend):
        self.backend, self.encoded = backend, 0

    def encode(self, *args, **kw):
        self.encoded += 1
        return self.backend.encode(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.backend, name)


class _Tokenizer:
    def __init__(self, tok):
        self.tok, self.backend = tok, _CountingBackend(tok.backend)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def test_a_huge_prompt_is_refused_before_it_is_tokenized(engine):
    from moekit.infer import Engine

    counting = Engine(engine.model, _Tokenizer(engine.tokenizer))
    a = create_app(counting, ServerSettings(model_name=NAME))
    try:
        huge = "x" * 2_000_000
        r_c, r_ch, r_list = post_all(a, [(C, raw({**OK, "prompt": huge})),
                                         (CH, raw({**OKC, "messages": [{"role": "user", "content": huge}]})),
                                         (C, raw({**OK, "prompt": ["ok", huge]}))])
        for r, param in ((r_c, "prompt"), (r_ch, "messages"), (r_list, "prompt[1]")):
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "2000000 characters" in r.json()["error"]["message"]
        assert counting.tokenizer.backend.encoded == 0
        near = post_all(a, [(C, raw({**OK, "prompt": "y" * 500}))])[0]  # too long, but only the tokens can tell
        assert near.status_code == 400 and counting.tokenizer.backend.encoded == 1
    finally:
        a.state.server.shutdown()


def test_a_body_cut_short_is_answered_without_a_traceback(app, caplog):
    sent = []

    async def go():
        messages = [{"type": "http.request", "body": b'{"model": "tiny", "pro', "more_body": True},
                    {"type": "http.disconnect"}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": C, "raw_path": C.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
                 "client": ("127.0.0.1", 1), "server": ("test", 80)}
        await app(scope, receive, send)

    with caplog.at_level(logging.INFO):
        asyncio.run(go())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert sent and sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400


def test_serve_on_port_0_prints_the_real_port_and_a_bad_host_is_one_message(tmp_path, engine):
    import os
    import re
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from moekit.checkpoints import save_checkpoint
    from moekit.config import to_dict
    from moekit.train.lm import RunConfig

    root = Path(__file__).parents[1]
    ckpt = tmp_path / "run"
    save_checkpoint(ckpt, 1, config=to_dict(RunConfig(model=engine.model.cfg)), model_state=engine.model.state_dict(),
                    optimizer_state=None, trainer_state={}, tokenizer=engine.tokenizer)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    serve = [sys.executable, "-m", "moekit", "serve", str(ckpt), "--model-name", NAME]
    bad = subprocess.run([*serve, "--host", "999.1.1.1"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "999.1.1.1" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    proc = subprocess.Popen([*serve, "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", first).group(1))
        assert port != 0, first
        assert "loaded" in proc.stdout.readline()
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        import socket

        with socket.create_connection(("127.0.0.1", port)) as s:  # a body cut short: the client goes away
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"model\": \"tiny\", \"pro")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=OK, timeout=30)
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "ClientDisconnect" not in err, err


def test_penalties_out_of_range_are_400_naming_the_field(app):
    bad = [({**OK, "presence_penalty": 2.5}, "presence_penalty"), ({**OK, "frequency_penalty": -3}, "frequency_penalty"),
           ({**OK, "repetition_penalty": 0}, "repetition_penalty"), ({**OK, "presence_penalty": "1"}, "presence_penalty")]
    for (body, param), r in zip(bad, post_all(app, [(C, raw(b)) for b, _ in bad])):
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
