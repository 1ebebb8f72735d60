"""From a checked request to generated choices: prompts, token budgets, the scheduler bridge, responses.

`build_prompts` turns a completion's prompt(s) or a chat's messages into
token ids (the model's chat template when it has one; otherwise the fallback
format below) and `plan` checks each against the context and the server's
token limit, and the request's `group_id` against the model (moekit.infer.groups),
naming the field at fault. `Job` submits one scheduler `Request`
per choice and turns the scheduler thread's events into an asyncio stream;
`complete` gathers them into an OpenAI response (a scheduler failure: 500
internal_error, the one 5xx); streaming.py streams them.

Chat prompts come from `moekit.infer.chat.chat_prompt` (as `moekit generate
--chat` builds them): the model's template, else the fallback format documented
there (moekit checkpoints have no chat template), which also stops at
"\\n\\nUser:".

Not here: HTTP routing and auth (app.py), SSE framing (streaming.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from ..errors import MoekitError
from ..infer import chat as chat_format  # (not `chat`: the name of a flag below)
from ..infer.chat import FALLBACK_STOP
from ..infer.sampling import SamplingConfig
from ..infer.groups import check_group_id
from ..infer.scheduler import QueueFullError, Request, ShuttingDownError
from .errors import APIError
from .schemas import ChatCompletionRequest


def fallback_chat(messages) -> str:
    """The documented chat format (moekit.infer.chat's) of a request's messages, for models without a template."""
    return chat_format.fallback_chat(_as_dicts(messages))


def _as_dicts(messages) -> list[dict]:
    return [{"role": m.role, "content": m.text} for m in messages]


def max_prompt_chars(engine) -> int | None:
    """Characters beyond which no prompt can fit the context, whatever the text (checked before tokenizing).

    A token covers at most `longest` characters of the vocabulary (bytes, for byte-level BPE); the margin
    covers normalizers that shrink text (Unicode composition). None: no tokenizer.
    """
    if engine.tokenizer is None:
        return None
    vocab = engine.tokenizer.backend.get_vocab(with_added_tokens=True)
    longest = max((len(t) for t in vocab), default=1)
    return engine.model.cfg.max_seq_len * longest * 4 + 1024


def _check_size(chars: int, max_chars: int | None, field: str, engine) -> None:
    if max_chars is not None and chars > max_chars:
        raise APIError(400, f"{field}: {chars} characters can never fit this model's context of "
                            f"{engine.model.cfg.max_seq_len} tokens (refused above {max_chars} characters, before "
                            f"tokenizing): shorten the prompt", param=field, code="context_length_exceeded")


def build_prompts(engine, body, max_chars: int | None = None) -> tuple[list[list[int]], list[str]]:
    """(token ids per prompt, extra stop strings) for a completion or chat request."""
    tok = engine.tokenizer
    if isinstance(body, ChatCompletionRequest):
        if tok is None:
            raise APIError(400, "this model has no tokenizer: chat needs one", param="messages")
        _check_size(sum(len(m.text) for m in body.messages), max_chars, "messages", engine)
        try:
            text, special, stops = chat_format.chat_prompt(_as_dicts(body.messages), engine.chat_template,
                                                           engine.special_tokens)
        except MoekitError as e:
            raise APIError(400, str(e), param="messages") from None
        return [tok.backend.encode(text, add_special_tokens=special).ids], stops
    prompts = body.prompts
    if prompts and isinstance(prompts[0], str):
        if tok is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        for i, p in enumerate(prompts):
            _check_size(len(p), max_chars, f"prompt[{i}]" if len(prompts) > 1 else "prompt", engine)
        return [tok.backend.encode(p, add_special_tokens=True).ids for p in prompts], []
    return [list(p) for p in prompts], []


@dataclass
class Plan:
    prompt_ids: list[list[int]]
    cfgs: list[list[SamplingConfig]]  # per prompt, one per choice
    group_id: int | None = None  # the routers' group of every token (models that route by task / modality)


def plan(engine, body, limit: int, max_chars: int | None = None) -> Plan:
    """Prompts and per-choice settings, after checking tokens, context and the token limit."""
    is_chat = isinstance(body, ChatCompletionRequest)
    field = "messages" if is_chat else "prompt"
    requested = body.requested_tokens if is_chat else body.max_tokens
    token_field = "max_completion_tokens" if is_chat and body.max_completion_tokens is not None else "max_tokens"
    if requested is not None and requested > limit:
        raise APIError(400, f"{token_field}={requested} is over this server's limit of {limit} tokens",
                       param=token_field, code="max_tokens_over_limit")
    try:
        check_group_id(engine.model.cfg, body.group_id)
    except MoekitError as e:
        raise APIError(400, str(e), param="group_id", code="invalid_value") from None
    prompt_ids, extra_stops = build_prompts(engine, body, max_chars)
    ctx = engine.model.cfg.max_seq_len
    cfgs = []
    for i, ids in enumerate(prompt_ids):
        name = f"{field}[{i}]" if len(prompt_ids) > 1 else field
        try:
            engine.check_prompts([ids])
        except MoekitError as e:
            raise APIError(400, f"{name}: {e}", param=field, code="invalid_prompt") from None
        if requested is not None and len(ids) + requested > ctx:
            raise APIError(400, f"this model's maximum context length is {ctx} tokens, but {len(ids)} prompt tokens "
                                f"+ {token_field}={requested} is {len(ids) + requested}: shorten the prompt or lower "
                                f"{token_field}", param=token_field, code="context_length_exceeded")
        budget = requested if requested is not None else min(limit, ctx - len(ids))
        cfgs.append(body.sampling_configs(budget, extra_stops))
    return Plan(prompt_ids, cfgs, body.group_id)


class Job:
    """The choices of one HTTP request in the scheduler; events arrive on an asyncio queue."""

    def __init__(self, scheduler, plan: Plan) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests: list[Request] = []
        self.prompt_tokens = sum(len(p) for p in plan.prompt_ids)
        self.created = int(time.time())
        try:
            for ids, cfgs in zip(plan.prompt_ids, plan.cfgs):
                for cfg in cfgs:
                    r = Request(list(ids), cfg, self._bridge(len(self.requests)), group_id=plan.group_id)
                    self.requests.append(r)
                    scheduler.submit(r)
        except QueueFullError as e:
            self.cancel()
            raise APIError(429, str(e), code="queue_full") from None
        except ShuttingDownError as e:
            self.cancel()
            raise APIError(503, str(e), code="shutting_down") from None

    def _bridge(self, index: int):
        def on_event(kind: str, payload) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, kind, payload))
            except RuntimeError:  # the event loop is gone (server stopped)
                pass
        return on_event

    async def batches(self):
        """Lists of (choice index, kind, payload): all events that arrived together, until every choice is done."""
        left = len(self.requests)
        while left:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            left -= sum(kind in ("done", "error") for _, kind, _ in batch)
            yield batch

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def cancelled_error() -> APIError:
    return APIError(503, "the request was cancelled: the server is shutting down", code="cancelled")


async def complete(job: Job, chat: bool, model_name: str, is_disconnected) -> dict:
    """Run a job to the end and build the (non-streaming) OpenAI response."""
    done = {}
    try:
        while len(done) < len(job.requests):
            try:
                index, kind, payload = await asyncio.wait_for(job.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await is_disconnected():
                    raise asyncio.CancelledError from None
                continue
            if kind == "error":  # the scheduler's internal error (its traceback is in the server log)
                raise APIError(500, str(payload), code="internal_error")
            if kind == "done":
                if payload.finish_reason == "cancelled":
                    raise cancelled_error()
                done[index] = payload
    finally:
        job.cancel()
    choices = []
    for i in range(len(job.requests)):
        c = done[i]
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                            "logprobs": None, "finish_reason": c.finish_reason})
        else:
            choices.append({"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason})
    return {
        "id": new_id("chatcmpl" if chat else "cmpl"),
        "object": "chat.completion" if chat else "text_completion",
        "created": job.created, "model": model_name, "choices": choices,
        "usage": usage(job.prompt_tokens, sum(len(c.token_ids) for c in done.values())),
    }


__all__ = ["Job", "plan", "max_prompt_chars", "complete", "fallback_chat", "build_prompts", "FALLBACK_STOP"]
