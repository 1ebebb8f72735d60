"""A fault inside the scheduler, seen through the HTTP server: the affected request gets one JSON error, promptly.

Faults are injected into the model's forward for one request (its prefill, or one of its decode steps).
Sent at the same time as healthy requests, streaming and not: the faulty one is answered 500 with the
OpenAI envelope (code internal_error, the only 5xx a request may get) or, once its stream started, a final
error frame then [DONE]; every healthy one gets the text `Engine.generate_ids` gives it alone (the oracle);
nothing waits past a short timeout, and the server answers the next request.
"""

import asyncio
import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from moekit.infer import SamplingConfig  # noqa: E402
from moekit.server import ServerSettings, create_app  # noqa: E402

from test_scheduler import tiny_engine  # noqa: E402
from test_scheduler_faults import MARK, Faulty  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
HEALTHY = [[10, 11, 12], [20, 21, 22, 23]]
FAULTS = {  # the faulty prompt's forward passes that raise
    "prefill": ([MARK, 1, 2, 3], lambda ids, kw: ids.shape[1] > 1 and bool((ids == MARK).any())),
    # its decode inputs sit at positions 8.. (the healthy ones' stay below 8)
    "decode": ([MARK, 1, 2, 3, 4, 5, 6, 7], lambda ids, kw: ids.shape[1] == 1 and bool((kw["positions_BT"] == 10).any())),
}


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.mark.parametrize("where", list(FAULTS))
@pytest.mark.parametrize("stream", [False, True])
def test_the_faulty_request_gets_one_json_error_and_the_others_their_solo_texts(engine, where, stream):
    faulty_prompt, when = FAULTS[where]
    app = create_app(engine, ServerSettings(model_name="m", max_batch=4))
    sched = app.state.server.scheduler
    sched.model = Faulty(sched.model, when)
    bodies = [{"model": "m", "prompt": p, "max_tokens": 5, "temperature": 0, "stream": stream}
              for p in [faulty_prompt, *HEALTHY]]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            answers = await asyncio.wait_for(asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies)), 60)
            after = await asyncio.wait_for(http.post("/v1/completions", json={**bodies[1], "stream": False}), 60)
            return answers, after

    try:
        (bad, *good), after = asyncio.run(go())
    finally:
        app.state.server.shutdown()
    if stream:
        frames = [line[6:] for line in bad.text.splitlines() if line.startswith("data: ")]
        assert bad.status_code == 200 and frames[-1] == "[DONE]"
        error = json.loads(frames[-2])["error"]
    else:
        assert bad.status_code == 500
        error = bad.json()["error"]
    assert error["code"] == "internal_error" and error["message"] == "internal error: RuntimeError: injected fault"
    for r, p in zip(good, HEALTHY):
        want = engine.generate_ids([p], SamplingConfig(max_new_tokens=5)).pop().text
        assert r.status_code == 200
        if stream:
            frames = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
            assert "".join(f["choices"][0]["text"] for f in frames) == want
        else:
            assert r.json()["choices"][0]["text"] == want
    assert after.status_code == 200 and after.json()["choices"][0]["text"] == \
        engine.generate_ids([HEALTHY[0]], SamplingConfig(max_new_tokens=5)).pop().text
