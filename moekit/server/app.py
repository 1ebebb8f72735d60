"""The FastAPI app: routes, API-key check, model loading state, shutdown.

`create_app(engine_or_loader, settings)` returns an app serving
GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming
or not), GET /health (503 until the model is loaded), GET /metrics
(Prometheus) and GET /v1/moe/stats (expert load and offloading counters).
Given an Engine the app is ready at once (tests); given a loader function the
model loads in a background thread when the app starts, so /health answers
503 meanwhile. Request bodies are parsed here (not by FastAPI's binding) so
every malformed body, from bad JSON to a wrong type, gets the OpenAI error
envelope with a 400 naming the field. `ServerState.shutdown` stops the
scheduler: running requests may finish within the timeout, the rest are cancelled.

Not here: the schemas (schemas.py), the prompt/budget rules and responses
(generation.py), SSE (streaming.py), the `moekit serve` command (moekit.cli.serve).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from ..infer.scheduler import Scheduler
from .errors import APIError, from_validation, install_handlers
from .generation import Job, complete, max_prompt_chars, plan
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest
from .streaming import stream_job

log = logging.getLogger("moekit.server")


@dataclass
class ServerSettings:
    model_name: str = "moekit"
    max_batch: int = 8
    max_queue: int = 64
    max_tokens_limit: int | None = None  # None: the model's context
    api_key: str | None = None
    shutdown_timeout: float = 10.0
    step_tokens: int | None = None  # most sequences decoded in one step (None: max_batch); < max_batch batches by expert
    max_wait: int = 8  # with known routes: steps a sequence may wait before it goes first


class ServerState:
    """The engine, its scheduler and metrics, and whether loading finished (or failed)."""

    def __init__(self, settings: ServerSettings, on_load_error: Callable[[BaseException], None] | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.engine = None
        self.scheduler: Scheduler | None = None
        self.load_error: BaseException | None = None
        self.max_prompt_chars: int | None = None
        self.on_load_error = on_load_error
        self.created = int(time.time())

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    def attach(self, engine) -> None:
        s = self.settings
        scheduler = Scheduler(engine, s.max_batch, s.max_queue, stats=self.metrics.stats, step_tokens=s.step_tokens,
                              max_wait=s.max_wait)
        scheduler.start()
        self.max_prompt_chars = max_prompt_chars(engine)
        self.engine = engine
        self.scheduler = scheduler

    def load(self, loader: Callable[[], object]) -> None:
        try:
            self.attach(loader())
        except BaseException as e:  # noqa: BLE001 - reported by /health and by the CLI
            self.load_error = e
            if self.on_load_error is not None:
                self.on_load_error(e)  # the CLI stops the server and reports it
            else:
                log.error("loading the model failed: %s", e)

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown(self.settings.shutdown_timeout)

    @property
    def token_limit(self) -> int:
        ctx = self.engine.model.cfg.max_seq_len
        limit = self.settings.max_tokens_limit
        return min(limit, ctx) if limit else ctx


def create_app(engine_or_loader, settings: ServerSettings | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    state = ServerState(settings, on_load_error)
    loader = engine_or_loader if callable(engine_or_loader) and not hasattr(engine_or_loader, "model") else None
    if loader is None:
        state.attach(engine_or_loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if loader is not None:
            threading.Thread(target=state.load, args=(loader,), name="moekit-load", daemon=True).start()
        yield
        await asyncio.to_thread(state.shutdown)

    app = FastAPI(title="moekit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    install_handlers(app)
    _routes(app, state)
    return _CountRequests(app, state.metrics)


def _ready_or_503(state: ServerState) -> None:
    if not state.ready:
        why = f"the model failed to load: {state.load_error}" if state.load_error else "the model is still loading"
        raise APIError(503, why, code="not_ready")


def _auth(state: ServerState, request: Request) -> None:
    key = state.settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    if not header:
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="missing_api_key")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "incorrect API key in the Authorization header", code="invalid_api_key")


def _routes(app: FastAPI, state: ServerState) -> None:
    _info_routes(app, state)
    _generation_routes(app, state)


def _info_routes(app: FastAPI, state: ServerState) -> None:
    s = state.settings

    @app.get("/health")
    async def health():
        if not state.ready:
            status = "error" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": str(state.load_error) if state.load_error else None},
                                status_code=503)
        return {"status": "ok", "model": s.model_name}

    @app.get("/metrics")
    async def metrics():
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    def model_card() -> dict:
        return {"id": s.model_name, "object": "model", "created": state.created, "owned_by": "moekit",
                "max_model_len": state.engine.model.cfg.max_seq_len}

    @app.get("/v1/models")
    async def models(request: Request):
        _auth(state, request)
        _ready_or_503(state)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _auth(state, request)
        _ready_or_503(state)
        if model_id != s.model_name:
            raise _unknown_model(model_id, s.model_name)
        return model_card()

    @app.get("/v1/moe/stats")
    async def moe_stats(request: Request):
        _auth(state, request)
        _ready_or_503(state)
        return {"model": s.model_name, **state.metrics.stats.moe_report(state.engine.offloader)}


def _generation_routes(app: FastAPI, state: ServerState) -> None:
    s = state.settings

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, ChatCompletionRequest, chat=True)

    async def _generate(request: Request, schema, chat: bool):
        _auth(state, request)
        try:
            raw = await request.body()
        except ClientDisconnect:  # the body was cut short: nobody is left to answer (and nothing to log)
            return Response(status_code=400)
        body = schema_from(raw, schema)
        if body.model != s.model_name:
            raise _unknown_model(body.model, s.model_name)
        _ready_or_503(state)
        _fits_the_queue(body, s)
        job = Job(state.scheduler, plan(state.engine, body, state.token_limit, state.max_prompt_chars))
        if body.stream:
            return StreamingResponse(stream_job(job, chat, s.model_name, body.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await complete(job, chat, s.model_name, request.is_disconnected)


def _fits_the_queue(body, s: ServerSettings) -> None:
    """400 for a request with more choices than the server ever holds at once (it would get 429 forever)."""
    prompts = 1 if isinstance(body, ChatCompletionRequest) else len(body.prompts)
    capacity = s.max_batch + s.max_queue
    if prompts * body.n <= capacity:
        return
    param = "n" if body.n > 1 and prompts <= capacity else ("messages" if prompts == 1 else "prompt")
    raise APIError(400, f"this request asks for {prompts * body.n} completions ({prompts} prompt(s) x n={body.n}), more "
                        f"than this server ever holds at once: {capacity} (max_batch {s.max_batch} + max_queue "
                        f"{s.max_queue}); send at most {capacity} per request", param=param, code="too_many_choices")


def schema_from(raw: bytes, schema):
    """Parse and check a JSON body; every failure is a 400 naming what is wrong."""
    if not raw.strip():
        raise APIError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        data = json.loads(raw, parse_int=_parse_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the JSON body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    _check_values(data, "")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise from_validation(e) from None
    except RecursionError:
        raise APIError(400, "the JSON body is nested too deeply", code="invalid_json") from None


MAX_INT_DIGITS = 40  # more than any field accepts (seed < 2**63 has 19 digits); Python refuses > 4300


class _HugeInt(int):
    """A JSON integer with more digits than any field accepts (kept as its digit count: Python limits int(str))."""

    digits: int


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) <= MAX_INT_DIGITS:
        return int(text)
    huge = _HugeInt(-1 if text.startswith("-") else 1)
    huge.digits = len(text.lstrip("-"))
    return huge


def _check_values(value, path: str) -> None:
    """400 naming the field for values no field accepts: over-long integers, text that is not valid Unicode."""
    if isinstance(value, dict):
        for key, v in value.items():
            _check_text(key, path or "body", "a field name")
            _check_values(v, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_values(v, f"{path}[{i}]")
    elif isinstance(value, _HugeInt):
        raise APIError(400, f"{path}: an integer of {value.digits} digits is out of range", param=path,
                       code="invalid_value")
    elif isinstance(value, str):
        _check_text(value, path, "the text")


def _check_text(text: str, path: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{path}: {what} holds a lone surrogate {text[e.start]!r} at character {e.start}, which "
                            f"is not valid Unicode: send UTF-8 text (escape pairs \\ud83d\\ude00 are fine)",
                       param=path, code="invalid_value") from None


def _unknown_model(name, served: str) -> APIError:
    return APIError(404, f"the model {name!r} does not exist: this server serves {served!r}", param="model",
                    code="model_not_found")


class _CountRequests:
    """ASGI wrapper counting answered HTTP requests by route and status (moekit_http_requests)."""

    KNOWN = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/moe/stats", "/health", "/metrics")

    def __init__(self, app: FastAPI, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in self.KNOWN else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


__all__ = ["create_app", "ServerSettings", "ServerState"]
