"""Per-sequence bookkeeping of generation (and `Completion`, `TokenCallback`): `SequenceState` (ids, decoded text, stop strings, finish reason).

Shared by the engine's decode loop (engine.py) and the server's scheduler (scheduler.py): a token goes in,
text comes out to the token callback, less any end that could still begin a stop string.
Not here: sampling (sampling.py), the loops themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# on_token(sequence index, token id, newly decoded text): text may be "" while a multi-byte character is
# incomplete; a last call with token id None flushes text held back at the end.
TokenCallback = Callable[[int, int | None, str], None]


@dataclass
class Completion:
    """One generated continuation."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop id or string) | "length" (token budget or context full)
    prompt_tokens: int


class SequenceState:
    """Generated ids of one sequence, its decoded text, and whether (and why) it stopped."""

    def __init__(self, index: int, prompt_tokens: int, tokenizer, stop_strings: list[str]) -> None:
        self.index = index
        self.prompt_tokens = prompt_tokens
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.ids: list[int] = []
        self.text = ""  # text decoded so far (complete characters only)
        self.sent = 0  # characters of text given to on_token (the rest could still start a stop string)
        self.done = False
        self.cut = False  # a stop string ended the text
        self.finish_reason = "length"

    def add(self, tok: int, stop_ids: set[int], needs_text: bool, on_token: TokenCallback | None) -> None:
        if tok in stop_ids:
            self.done, self.finish_reason = True, "stop"
            return
        self.ids.append(tok)
        if not needs_text:
            return
        full = self.tokenizer.decode(self.ids)
        if not full.endswith("\ufffd"):  # else an incomplete multi-byte character: wait for its next token
            cut = self._stop_at(full)
            if cut is not None:
                full = full[:cut]
                self.done, self.cut, self.finish_reason = True, True, "stop"
            if not full.startswith(self.text):  # (a decoding that changed earlier text: send only what follows)
                self.sent = len(full)
            self.text = full
        if on_token is not None:
            on_token(self.index, tok, self._unsent(final=self.cut))

    def flush(self, on_token: TokenCallback | None) -> None:
        """Emit text held back: the rest of a character, or an end that could have begun a stop string."""
        if not self.cut:
            full = self.tokenizer.decode(self.ids)
            if full.startswith(self.text) and len(full) > len(self.text):
                self.text = full
        rest = self._unsent(final=True)
        if rest and on_token is not None:
            on_token(self.index, None, rest)

    def _unsent(self, final: bool) -> str:
        """Text not given to on_token yet, less (unless final) an end that could be the start of a stop string."""
        end = len(self.text) if final else len(self.text) - self._could_start_a_stop()
        new = self.text[self.sent:end] if end > self.sent else ""
        self.sent += len(new)
        return new

    def _could_start_a_stop(self) -> int:
        """Characters at the end of the text that are the start of some stop string."""
        best = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _stop_at(self, full: str) -> int | None:
        if not self.stop_strings:
            return None
        longest = max(len(s) for s in self.stop_strings)
        lo = max(0, len(self.text) - longest)  # a stop string may straddle the last emitted text
        hits = [i for i in (full.find(s, lo) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None

    def result(self) -> Completion:
        if self.tokenizer is None:
            text = ""
        else:
            text = self.text if self.cut else self.tokenizer.decode(self.ids)
        return Completion(text, list(self.ids), self.finish_reason, self.prompt_tokens)
