"""`moekit generate MODEL` without --prompt: an interactive chat in the terminal.

Each line typed is a user turn; the whole conversation (an optional --system message, then the turns so far)
goes through the model's chat template, or the fallback format the server uses for models without one
(moekit.infer.chat.chat_prompt), and the reply streams as it is generated. `/reset` clears the history,
`/exit`, `/quit` or end of input (Ctrl-D) ends. When the conversation outgrows the context, its oldest turns
are dropped (the system message stays) and the REPL says so. Prompts go to stderr, replies to stdout.

Not here: the flags and the one-shot path (generate.py), building the chat text (moekit.infer.chat).
"""

from __future__ import annotations

import sys

from ..errors import ConfigError

HELP = "chat: one line a turn; /reset clears the history; /exit or Ctrl-D ends"


def chat_repl(engine, settings, system: str | None, stdin=None, group_ids=None) -> int:
    """Read turns from stdin until its end or /exit; stream each reply; keep the history (group_ids: --task's id)."""
    if not (engine.chat_template or engine.chat_fallback):
        raise ConfigError("this model has no chat template (tokenizer_config.json has no 'chat_template'): give --prompt")
    stdin = stdin or sys.stdin
    settings.stop_strings = [*settings.stop_strings, *engine.chat_stops()]
    head = [{"role": "system", "content": system}] if system else []
    turns: list[dict] = []
    print(HELP, file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            print(file=sys.stderr)
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            turns = []
            print("(history cleared)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        turns.append({"role": "user", "content": text})
        turns = _fit(engine, head, turns, settings)
        if not turns:
            continue
        reply = _reply(engine, _encode(engine, head + turns), settings, group_ids)
        turns.append({"role": "assistant", "content": reply})


def _encode(engine, messages: list[dict]) -> list[int]:
    from ..infer.chat import chat_prompt

    text, special, _ = chat_prompt(messages, engine.chat_template, engine.special_tokens)
    return engine.tokenizer.backend.encode(text, add_special_tokens=special).ids


def _fit(engine, head: list[dict], turns: list[dict], settings) -> list[dict]:
    """The turns whose prompt leaves room for at least one new token, dropping the oldest exchanges (said)."""
    context = engine.model.cfg.max_seq_len
    dropped = 0
    while turns and len(_encode(engine, head + turns)) >= context - 1:
        turns = turns[2:] if len(turns) > 1 else []
        dropped += 1
    if dropped and turns:
        print(f"(the conversation outgrew the {context}-token context: its {dropped} oldest exchange(s) were dropped)",
              file=sys.stderr)
    elif dropped:
        print(f"(that turn alone does not fit the {context}-token context: nothing was generated)", file=sys.stderr)
    return turns


def _reply(engine, prompt: list[int], settings, group_ids=None) -> str:
    def stream(index: int, token, text: str) -> None:
        print(text, end="", flush=True)

    out = engine.generate_ids([prompt], settings, on_token=stream, group_ids=group_ids)[0]
    print(flush=True)
    return out.text
