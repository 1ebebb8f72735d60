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
