"""Answer refinement with a large model in context (JiuZhang 2.0's refinement step).

A moekit model drafts an answer (greedy decode, moekit.train.multitask); the
draft, the problem and a few solved examples of the same task go to any
OpenAI-compatible chat-completions endpoint (`moekit serve`, vLLM, llama.cpp's
server, a hosted API), and the corrected answer in its reply is kept. One HTTP
POST per problem with httpx; nothing is retried. An endpoint that cannot be
reached or answers with an error or an unexpected body is one `EndpointError`.

Not here: the drafting model's training (train/multitask.py), the server (moekit.server).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.mathtasks import Problem
from ..errors import EndpointError

SYSTEM_PROMPT = ("You check answers to math problems. Each problem comes with a draft answer that may be wrong. "
                 "Reply with the correct final answer only: no words, no units, no explanation.")


@dataclass
class Refined:
    problem: Problem
    draft: str
    answer: str  # the endpoint's corrected answer (the draft when the reply held no answer)
    reply: str  # the endpoint's whole reply text


def build_messages(prompt: str, draft: str, examples: list[Problem]) -> list[dict]:
    """The chat request: the instructions, solved examples, then the problem with its draft."""
    shots = "\n".join(f"Problem: {e.prompt}\nAnswer: {e.answer}" for e in examples)
    user = (f"Solved examples:\n{shots}\n\n" if examples else "") + f"Problem: {prompt}\nDraft answer: {draft}\nAnswer:"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def answer_from_reply(reply: str) -> str:
    """The first non-empty line of the reply, without an 'Answer:' label."""
    for line in reply.splitlines():
        line = line.strip()
        if line.lower().startswith("answer:"):
            line = line[len("answer:"):].strip()
        if line:
            return line
    return ""


def chat_completion(client, endpoint: str, model: str, messages: list[dict], api_key: str | None = None) -> str:
    """POST {endpoint}/chat/completions (endpoint like http://host:port/v1) and return the reply text."""
    import httpx

    url = endpoint.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 32}
    try:
        response = client.post(url, json=body, headers=headers)
    except httpx.InvalidURL as e:
        raise EndpointError(f"--endpoint {endpoint!r} is not a valid URL ({e}): give one like http://localhost:8000/v1") from None
    except httpx.HTTPError as e:
        raise EndpointError(f"endpoint {url} cannot be reached ({type(e).__name__}: {e}): is the server running, "
                            f"and is the URL its OpenAI-compatible base (ending in /v1)?") from None
    if response.status_code == 400 and _too_long(response):
        raise ContextLengthError(f"endpoint {url}: the request does not fit the model's context: {response.text[:200]!r}")
    if response.status_code != 200:
        raise EndpointError(f"endpoint {url} answered HTTP {response.status_code}: {response.text[:200]!r}")
    try:
        return response.json()["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError):
        raise EndpointError(f"endpoint {url} did not answer like an OpenAI chat completion (no "
                            f"choices[0].message.content): {response.text[:200]!r}") from None


class ContextLengthError(EndpointError):
    """The endpoint said the request is longer than its model's context (OpenAI's context_length_exceeded)."""


def _too_long(response) -> bool:
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        return False
    return error.get("code") == "context_length_exceeded" or "context length" in str(error.get("message", ""))


def _fitted(client, endpoint, model, problem, draft, shots, api_key) -> str:
    """The reply to the problem with as many of its solved examples as the served model's context holds."""
    for k in range(len(shots), -1, -1):  # fewer examples each time the endpoint says the request is too long
        try:
            return chat_completion(client, endpoint, model, build_messages(problem.prompt, draft, shots[:k]), api_key)
        except ContextLengthError:
            if k == 0:
                raise ContextLengthError(f"endpoint {endpoint}: even without solved examples, problem {problem.prompt!r} "
                                         "does not fit the served model's context") from None
    raise AssertionError("unreachable")


def refine(problems: list[Problem], drafts: list[str], examples: dict[str, list[Problem]], endpoint: str, model: str,
           api_key: str | None = None, timeout: float = 60.0, transport=None) -> list[Refined]:
    """Send each problem's draft with its task's solved examples; keep the endpoint's corrected answer.

    A request the served model's context cannot hold (HTTP 400, context_length_exceeded) is sent again with
    one solved example fewer, down to none: the few-shot prompt fits the model it is served to.
    """
    try:
        import httpx
    except ImportError:
        raise EndpointError("moekit refine needs httpx: pip install 'moekit[refine]' (or httpx)") from None

    if not endpoint.startswith(("http://", "https://")):
        raise EndpointError(f"--endpoint {endpoint!r} is invalid: give an http(s) URL such as http://localhost:8000/v1")
    out = []
    with httpx.Client(timeout=timeout, transport=transport) as client:
        for problem, draft in zip(problems, drafts):
            reply = _fitted(client, endpoint, model, problem, draft, examples.get(problem.task, []), api_key)
            out.append(Refined(problem, draft, answer_from_reply(reply) or draft, reply))
    return out


def refine_checkpoint(path, endpoint: str, model: str, api_key: str | None = None, task: str | None = None,
                      prompt: str | None = None, problems: int = 5, examples: int = 3, transport=None) -> dict:
    """Draft with the math_tasks model in `path`, refine at `endpoint`; exact match before and after.

    prompt=None: the first `problems` test problems of `task` (or of every task); with a prompt, `task` names it.
    The solved examples are the first `examples` training problems of each problem's task.
    """
    from ..errors import ConfigError
    from ..train.lm import load_lm
    from ..train.multitask import build_suite, task_id
    from .answers import greedy_answers

    lm, _, cfg = load_lm(path)
    if cfg.data.kind != "math_tasks":
        raise ConfigError(f"{path} is not a math_tasks model (its data.kind is {cfg.data.kind!r}): moekit refine "
                          f"drafts answers with a model trained with data.kind=math_tasks")
    tasks = list(cfg.data.math.tasks)
    chosen = [tasks[task_id(tasks, task)]] if task is not None else tasks
    if prompt is not None and task is None:
        raise ConfigError(f"--prompt needs --task (the model routes by task): one of {', '.join(tasks)}")
    if problems < 1 or examples < 0:
        raise ConfigError(f"--problems {problems} / --examples {examples} are invalid: give problems >= 1, examples >= 0")
    suite = build_suite(cfg.data.math)
    todo = [Problem(chosen[0], prompt if prompt.endswith("=") else prompt + "=", "")] if prompt is not None else \
        [p for t in chosen for p in suite.test[t][:problems]]
    drafts = greedy_answers(lm, [p.prompt for p in todo], [tasks.index(p.task) for p in todo])
    shots = {t: suite.train[t][:examples] for t in chosen}
    results = refine(todo, drafts, shots, endpoint, model, api_key, transport=transport)
    scored = prompt is None
    return {"results": results, "scored": scored,
            "draft_accuracy": sum(r.draft == r.problem.answer for r in results) / len(results) if scored else None,
            "refined_accuracy": sum(r.answer == r.problem.answer for r in results) / len(results) if scored else None}
