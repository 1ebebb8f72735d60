"""The OpenAI request bodies the server accepts, as pydantic v2 models, and their checks.

`CompletionRequest` (POST /v1/completions) and `ChatCompletionRequest`
(POST /v1/chat/completions) follow the OpenAI API: unknown fields are refused
(a misspelt `max_token` is a 400 naming it, not a silently ignored setting);
types are strict (`"5"` is not a number, `true` is not an integer); OpenAI
fields moekit does not implement (`logprobs`, `echo`, `best_of`, `suffix`,
`logit_bias`, tools) are accepted only at their "off" value. `top_k` and
`repetition_penalty` are extensions (as in vLLM: top_k 0 or -1 = no limit;
repetition_penalty as transformers'); presence and frequency penalties follow
OpenAI (-2..2, over the generated tokens). `group_id` is moekit's extension for
models that route by group (a task id for `data.kind=math_tasks` models, a
modality): an integer >= 0, checked against the model in generation.py.
`sampling_config` turns a request into one `SamplingConfig` per choice
(choice j of a seeded request uses seed + j).

Not here: the limits that depend on the model (max_tokens against the
context: app.py), responses (built as plain dicts in app.py / streaming.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..infer.sampling import SamplingConfig

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP = 4  # as OpenAI
MAX_N = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data):
        """OpenAI clients send `null` for "not set": treat it as the field's default."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(default=None)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)  # OpenAI's range
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)  # an extension (as vLLM): transformers' rule
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None
    group_id: int | None = Field(default=None, ge=0)  # an extension: the routers' group (task, modality) of every token

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError("must be an integer >= 1")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are accepted, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logprobs not in (None, False, 0):
            raise _Unsupported("logprobs", "is not supported by moekit serve")
        if self.logit_bias:
            raise _Unsupported("logit_bias", "is not supported by moekit serve")
        if self.stream_options is not None and not self.stream:
            raise _Unsupported("stream_options", "is only allowed when stream is true")
        return self

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_configs(self, max_new_tokens: int, extra_stops: list[str] = ()) -> list[SamplingConfig]:
        """One SamplingConfig per choice; choice j of a seeded request is seeded seed + j."""
        return [SamplingConfig(max_new_tokens=max_new_tokens, temperature=float(self.temperature),
                               top_k=max(0, self.top_k), top_p=float(self.top_p),
                               seed=None if self.seed is None else self.seed + j,
                               stop_strings=[*self.stop_strings, *extra_stops],
                               presence_penalty=float(self.presence_penalty),
                               frequency_penalty=float(self.frequency_penalty),
                               repetition_penalty=float(self.repetition_penalty))
                for j in range(self.n)]


class _Unsupported(ValueError):
    """A field set to a value moekit does not implement (reported with the field's name as param)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must not be an empty list")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("token-id prompts must not be empty")
        return v

    @model_validator(mode="after")
    def _off(self):
        if self.echo:
            raise _Unsupported("echo", "is not supported by moekit serve")
        if self.best_of not in (None, 1):
            raise _Unsupported("best_of", "is not supported by moekit serve (use n)")
        if self.suffix:
            raise _Unsupported("suffix", "is not supported by moekit serve")
        return self

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [list(p)]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: str
    content: str | list[TextPart] | None = Field(default=None, validate_default=True)
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, v):
        if v not in ROLES:
            raise ValueError(f"unknown role {v!r}: accepted roles are {', '.join(ROLES)}")
        return v

    @field_validator("content")
    @classmethod
    def _content(cls, v, info):
        """As OpenAI's API: only an assistant message may come without content."""
        role = info.data.get("role")
        if v is None and role is not None and role != "assistant":
            raise ValueError(f"a {role!r} message needs content (a string or a list of text parts); "
                             "only an assistant message may leave it out")
        return v

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        if not v:
            raise ValueError("must contain at least one message")
        return v

    @field_validator("max_completion_tokens")
    @classmethod
    def _positive_completion(cls, v):
        if v is not None and v < 1:
            raise ValueError("must be an integer >= 1")
        return v

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


__all__ = ["CompletionRequest", "ChatCompletionRequest", "Message", "ROLES"]
