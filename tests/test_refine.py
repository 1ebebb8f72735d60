"""`moekit refine` against a local stub of an OpenAI-compatible endpoint (FastAPI + uvicorn on a free port)."""

import json
import re
import socket
import threading
import time

import pytest

from moekit.cli.main import main
from moekit.data.mathtasks import make_suite

pytestmark = pytest.mark.usefixtures("one_thread")


class Stub:
    """Answers every chat completion by solving the arithmetic problem in it with Python; records requests."""

    def __init__(self):
        from fastapi import FastAPI, Request

        self.requests = []
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append({"body": body, "auth": request.headers.get("authorization")})
            problem = re.findall(r"Problem: (\d+[+\-*]\d+)=\nDraft answer", body["messages"][-1]["content"])[0]
            return {"id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": f"Answer: {eval(problem)}"}}]}

        self.app = app


@pytest.fixture(scope="module")
def stub():
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stub = Stub()
    server = uvicorn.Server(uvicorn.Config(stub.app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    stub.url = f"http://127.0.0.1:{port}/v1"
    yield stub
    server.should_exit = True
    thread.join(timeout=10)


RUN = ["--preset", "math_tasks", "--quiet", "train.steps=3", "train.batch_size=4", "train.seq_len=40",
       "train.eval_every=0", "train.save_every=0", "train.eval_batches=1", "model.hidden_size=32", "model.num_layers=1",
       "moe.expert_hidden=32", "moe.num_experts=4", "data.math.tasks=[\"arithmetic\"]", "data.math.train_sizes=[40]",
       "data.math.test_size=6", "data.math.eval_problems=2", "train.device=cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("refine") / "run"
    assert main(["train", "--out", str(out), *RUN]) == 0
    return out


def test_refine_sends_draft_and_examples_and_keeps_the_correction(run, stub, capsys, tmp_path):
    capsys.readouterr()
    stub.requests.clear()
    out_file = tmp_path / "refined.jsonl"
    code = main(["refine", str(run), "--endpoint", stub.url, "--model", "big-model", "--api-key", "sk-test",
                 "--problems", "4", "--examples", "2", "--out", str(out_file)])
    assert code == 0
    printed = capsys.readouterr().out
    suite = make_suite(["arithmetic"], [40], test_size=6, seed=0)  # the run's suite, rebuilt here
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(stub.requests) == len(rows) == 4
    for req, row, problem in zip(stub.requests, rows, suite.test["arithmetic"][:4]):
        assert req["auth"] == "Bearer sk-test" and req["body"]["model"] == "big-model"
        user = req["body"]["messages"][-1]["content"]
        assert f"Problem: {problem.prompt}\nDraft answer: {row['draft']}\n" in user
        for example in suite.train["arithmetic"][:2]:
            assert f"Problem: {example.prompt}\nAnswer: {example.answer}" in user
        assert suite.train["arithmetic"][2].prompt not in user
        assert row["refined"] == str(eval(problem.prompt[:-1])) == problem.answer  # the stub's correction is kept
        assert f"draft {row['draft']!r} -> refined {row['refined']!r}" in printed
    assert "refined 100.0%" in printed


def test_refine_one_prompt(run, stub, capsys):
    capsys.readouterr()
    assert main(["refine", str(run), "--endpoint", stub.url, "--model", "m", "--task", "arithmetic",
                 "--prompt", "123+456"]) == 0
    assert "-> refined '579'" in capsys.readouterr().out


@pytest.mark.parametrize("endpoint, message", [
    ("http://127.0.0.1:{dead}/v1", "cannot be reached"),
    ("localhost:8000", "give an http(s) URL"),
    ("{stub}/nothing/v1", "answered HTTP 404"),
])
def test_bad_endpoint_is_one_clear_message(run, stub, capsys, endpoint, message):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed again: nothing listens there
    endpoint = endpoint.format(dead=dead, stub=stub.url.removesuffix("/v1"))
    capsys.readouterr()
    assert main(["refine", str(run), "--endpoint", endpoint, "--model", "m", "--problems", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_task_the_model_was_not_trained_on(run, stub, capsys):
    capsys.readouterr()
    assert main(["refine", str(run), "--endpoint", stub.url, "--model", "m", "--task", "comparison"]) == 2
    err = capsys.readouterr().err
    assert "task 'comparison' is not one this model was trained on: it knows arithmetic" in err
    assert len(err.strip().splitlines()) == 1


def test_few_shot_examples_are_fitted_to_the_served_context():
    """Issue 25: refine against a small served model failed (548-token prompt, 512 context). Oracle: a mock endpoint
    that refuses, as moekit serve does (400, context_length_exceeded), any request holding more than 2 examples."""
    import httpx

    from moekit.data.mathtasks import Problem
    from moekit.infer.refine import ContextLengthError, refine

    seen = []

    def handler(request):
        body = json.loads(request.content)
        shots = body["messages"][-1]["content"].count("\nAnswer: ")
        seen.append(shots)
        if shots > 2:
            return httpx.Response(400, json={"error": {"message": "this model's maximum context length is 512 tokens",
                                                       "type": "invalid_request_error", "param": "messages",
                                                       "code": "context_length_exceeded"}})
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": "Answer: 7"}}]})

    examples = {"arithmetic": [Problem("arithmetic", f"{i}+1=", str(i + 1)) for i in range(5)]}
    out = refine([Problem("arithmetic", "3+4=", "7")], ["6"], examples, "http://stub/v1", "m",
                 transport=httpx.MockTransport(handler))
    assert out[0].answer == "7" and seen == [5, 4, 3, 2]  # one example fewer each time, until it fits
    never = httpx.MockTransport(lambda r: httpx.Response(400, json={"error": {"code": "context_length_exceeded",
                                                                              "message": "too long"}}))
    with pytest.raises(ContextLengthError, match="even without solved examples"):
        refine([Problem("arithmetic", "3+4=", "7")], ["6"], examples, "http://stub/v1", "m", transport=never)
