"""Choosing the next token from logits: penalties, greedy, temperature, top-k, top-p; checked settings.

`SamplingConfig` holds what a generation call may set (validated once, with
one clear message per bad value); `next_tokens` turns a batch of last-position
logits into token ids on the logits' device, with no host synchronisation.
Semantics follow transformers' logits warpers (temperature, then top-k, then
top-p keeping the smallest set whose probability reaches p, at least one
token), so seeded sampling is reproducible run to run.

Not here: the prefill/decode loop and stopping (engine.py).

Shape legend: B batch, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from ..errors import ConfigError


@dataclass
class SamplingConfig:
    """Generation settings; temperature 0 means greedy (top_k / top_p are then unused)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k limit
    top_p: float = 1.0  # 1: no nucleus limit
    seed: int | None = 0  # None: a non-reproducible seed
    stop_token_ids: list[int] | None = None  # None: the model's end-of-sequence ids
    stop_strings: list[str] = field(default_factory=list)
    repetition_penalty: float = 1.0  # transformers' rule over prompt + generated tokens; 1: off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated so far

    def __post_init__(self) -> None:
        validate(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


ALIASES = {"stop": "stop_strings", "max_tokens": "max_new_tokens"}  # OpenAI's names


def sampling_config(**settings) -> SamplingConfig:
    """A SamplingConfig from keyword settings, OpenAI's names (stop, max_tokens) included; one message otherwise."""
    known = [f.name for f in fields(SamplingConfig)]
    given, keys = {}, {}
    for key, value in settings.items():
        name = ALIASES.get(key, key)
        if name not in known:
            raise ConfigError(f"unknown generation setting {key!r}: the settings are {', '.join(known)} "
                              f"(OpenAI's {' and '.join(ALIASES)} are accepted for {' and '.join(ALIASES.values())})")
        if name in given:
            raise ConfigError(f"{keys[name]} and {key} are the same setting ({name}): give one of them")
        given[name], keys[name] = value, key
    return SamplingConfig(**given)


def validate(c: SamplingConfig) -> None:
    if not isinstance(c.max_new_tokens, int) or isinstance(c.max_new_tokens, bool) or c.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={c.max_new_tokens!r} is invalid: it must be an integer >= 1")
    if not _number(c.temperature) or c.temperature < 0:
        raise ConfigError(f"temperature={c.temperature!r} is invalid: it must be a finite number >= 0 (0 = greedy)")
    if not isinstance(c.top_k, int) or isinstance(c.top_k, bool) or c.top_k < 0:
        raise ConfigError(f"top_k={c.top_k!r} is invalid: it must be an integer >= 0 (0 = no limit)")
    if not _number(c.top_p) or not 0 < c.top_p <= 1:
        raise ConfigError(f"top_p={c.top_p!r} is invalid: it must be in (0, 1]")
    if c.seed is not None and (not isinstance(c.seed, int) or isinstance(c.seed, bool) or c.seed < 0):
        raise ConfigError(f"seed={c.seed!r} is invalid: it must be an integer >= 0")
    if c.stop_token_ids is not None:
        if isinstance(c.stop_token_ids, int):
            c.stop_token_ids = [c.stop_token_ids]
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in c.stop_token_ids):
            raise ConfigError(f"stop_token_ids={c.stop_token_ids!r} is invalid: it must be a list of token ids >= 0")
    if not _number(c.repetition_penalty) or c.repetition_penalty <= 0:
        raise ConfigError(f"repetition_penalty={c.repetition_penalty!r} is invalid: it must be a finite number > 0 "
                          "(1 = off, > 1 discourages repeats)")
    for name in ("presence_penalty", "frequency_penalty"):
        if not _number(getattr(c, name)):
            raise ConfigError(f"{name}={getattr(c, name)!r} is invalid: it must be a finite number (0 = off, "
                              "> 0 discourages repeats; OpenAI accepts -2..2)")
    if isinstance(c.stop_strings, str):
        c.stop_strings = [c.stop_strings]
    if any(not isinstance(s, str) or not s for s in c.stop_strings):
        raise ConfigError(f"stop_strings={c.stop_strings!r} is invalid: it must be a list of non-empty strings")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


class Penalties:
    """The token history of a batch for the repetition, presence and frequency penalties.

    repetition (transformers' RepetitionPenaltyLogitsProcessor): the logit of every token of the prompt
    or generated so far is divided by the penalty when positive, multiplied when negative. presence and
    frequency (OpenAI's): logits[t] -= presence * (count[t] > 0) + frequency * count[t], counting the
    generated tokens only. Applied in that order, to the raw logits (before temperature, top-k, top-p).
    """

    def __init__(self, c: SamplingConfig, prompt_ids: list[list[int]]) -> None:
        self.c, self.prompt_ids = c, prompt_ids
        self.counts_BV: torch.Tensor | None = None  # generated tokens (made at the first step: V from the logits)
        self.seen_BV: torch.Tensor | None = None  # prompt + generated tokens

    def apply(self, logits_BV: torch.Tensor) -> torch.Tensor:
        c = self.c
        if self.counts_BV is None:
            self.counts_BV = torch.zeros(logits_BV.shape, dtype=torch.float32, device=logits_BV.device)
            self.seen_BV = torch.zeros(logits_BV.shape, dtype=torch.bool, device=logits_BV.device)
            for b, ids in enumerate(self.prompt_ids):
                self.seen_BV[b, torch.tensor(ids, dtype=torch.long, device=logits_BV.device)] = True
        logits = logits_BV.float()
        if c.repetition_penalty != 1:
            r = c.repetition_penalty
            logits = torch.where(self.seen_BV, torch.where(logits < 0, logits * r, logits / r), logits)
        if c.presence_penalty or c.frequency_penalty:
            logits = logits - c.frequency_penalty * self.counts_BV - c.presence_penalty * (self.counts_BV > 0).float()
        return logits

    def record(self, tok_B: torch.Tensor) -> None:
        rows = torch.arange(tok_B.shape[0], device=tok_B.device)
        self.counts_BV[rows, tok_B] += 1
        self.seen_BV[rows, tok_B] = True


def next_tokens(logits_BV: torch.Tensor, c: SamplingConfig, generator: torch.Generator | None = None,
                penalties: Penalties | None = None) -> torch.Tensor:
    """Token ids [B] for the last-position logits [B, V] (penalised by, and recorded in, `penalties`)."""
    if penalties is not None:
        logits_BV = penalties.apply(logits_BV)
        tok_B = _sample(logits_BV, c, generator)
        penalties.record(tok_B)
        return tok_B
    return _sample(logits_BV, c, generator)


def _sample(logits_BV: torch.Tensor, c: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    if c.greedy:
        return logits_BV.argmax(-1)
    logits = logits_BV.float() / c.temperature
    if c.top_k and c.top_k < logits.shape[-1]:
        kth = logits.topk(c.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if c.top_p < 1.0:
        logits = _top_p(logits, c.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _top_p(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches top_p (always the best one)."""
    sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability of the better tokens
    drop_sorted = before >= top_p
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits_BV.masked_fill(drop, float("-inf"))
