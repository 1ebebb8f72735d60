"""Server-sent events for `stream: true`: OpenAI chunks, the usage chunk, `data: [DONE]`.

`stream_job` yields `data: {json}\\n\\n` frames as the scheduler produces
tokens: for chat a first chunk with the assistant role, then content deltas,
then one chunk per choice carrying its finish_reason; with
`stream_options.include_usage` every chunk has `"usage": null` and a last
chunk (no choices) carries the counts. A failure after the stream started is
sent as a final `{"error": {...}}` frame, then `[DONE]`. If the client goes
away the generator is closed and every choice is cancelled (its batch slot is
freed before the next decode step).

Not here: building the job (generation.py), routes (app.py).
"""

from __future__ import annotations

import json

from .errors import APIError
from .generation import Job, cancelled_error, new_id, usage

DONE = "data: [DONE]\n\n"


def frame(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream_job(job: Job, chat: bool, model_name: str, include_usage: bool):
    cid = new_id("chatcmpl" if chat else "cmpl")
    base = {"id": cid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": job.created, "model": model_name}
    if include_usage:
        base["usage"] = None

    def chunk(index: int, text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return frame({**base, "choices": [choice]})

    completion_tokens = 0
    try:
        if chat:
            for i in range(len(job.requests)):
                yield chunk(i, None, role=True)
        async for batch in job.batches():  # events that arrived together go out in one write
            frames = []
            for index, kind, payload in batch:
                if kind == "token":
                    if payload[1]:
                        frames.append(chunk(index, payload[1]))
                elif kind == "done":
                    if payload.finish_reason == "cancelled":
                        raise cancelled_error()
                    completion_tokens += len(payload.token_ids)
                    frames.append(chunk(index, None, payload.finish_reason))
                else:
                    raise APIError(500, str(payload), code="internal_error")
            if frames:
                yield "".join(frames)
        if include_usage:
            yield frame({**base, "choices": [], "usage": usage(job.prompt_tokens, completion_tokens)})
    except APIError as e:
        yield frame(e.body())
    finally:
        job.cancel()  # a client that went away (or an error): free the slots
    yield DONE


__all__ = ["stream_job", "frame", "DONE"]
