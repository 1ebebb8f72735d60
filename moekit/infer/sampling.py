"""Choosing the next token from logits: greedy, temperature, top-k, top-p; checked settings.

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
from dataclasses import dataclass, field

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

    def __post_init__(self) -> None:
        validate(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


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


def next_tokens(logits_BV: torch.Tensor, c: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids [B] for the last-position logits [B, V]."""
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
