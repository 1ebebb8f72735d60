"""Chat templates, special tokens and stop ids of a model directory, as generation uses them.

`load_chat_template` finds a directory's template (chat_template.jinja, or
tokenizer_config.json's entry, named or not), `render_chat` applies it to
{role, content} messages the way transformers does (sandboxed jinja2),
`special_tokens` gives the bos/eos/pad/unk strings templates refer to, and
`stop_token_ids` the end-of-sequence ids generation stops at. `chat_prompt` is
how both `moekit generate --chat` and the server's chat endpoint turn messages
into prompt text: the model's template, or (a model without one: every moekit
checkpoint) the fallback format of `fallback_chat`::

    System: {system content}\n\nUser: {user content}\n\nAssistant: {assistant content}\n\nAssistant:

i.e. each message as "{Role}: {content}" separated by a blank line, ending
with "Assistant:"; generation then also stops at FALLBACK_STOP ("\n\nUser:").

Not here: reading the files themselves (moekit.hf.load: `tokenizer_config`,
`stored_eos_token_id`, `load_tokenizer`), writing them (moekit.hf.save),
the generation loop (engine.py).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from ..errors import ConfigError
from ..hf.reader import stored_eos_token_id, tokenizer_config

CHAT_TEMPLATE_FILE = "chat_template.jinja"
FALLBACK_STOP = "\n\nUser:"
FALLBACK_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def fallback_chat(messages: list[dict]) -> str:
    """The documented chat format for models without a template ({role, content} messages)."""
    return "\n\n".join(f"{FALLBACK_ROLES[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def chat_prompt(messages: list[dict], template: str | None, tokens: dict[str, str]) -> tuple[str, bool, list[str]]:
    """(prompt text, whether the tokenizer adds its special tokens, extra stop strings) of a chat.

    With a template: the template's text (it holds its own special tokens). Without: the fallback format,
    special tokens added as for a plain prompt, and FALLBACK_STOP to end the assistant's turn.
    """
    if template:
        return render_chat(template, messages, add_generation_prompt=True, **tokens), False, []
    return fallback_chat(messages), True, [FALLBACK_STOP]


def load_chat_template(path: str | Path) -> str | None:
    """The chat template of a model directory: chat_template.jinja, or tokenizer_config.json's entry."""
    d = Path(path)
    if (d / CHAT_TEMPLATE_FILE).is_file():
        return (d / CHAT_TEMPLATE_FILE).read_text()
    template = tokenizer_config(d).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def special_tokens(path: str | Path) -> dict[str, str]:
    """bos/eos/pad/unk token strings from tokenizer_config.json (what chat templates refer to)."""
    out = {}
    for key, value in tokenizer_config(path).items():
        if key.endswith("_token") and value is not None:
            out[key] = value["content"] if isinstance(value, dict) else str(value)
    return out


def stop_token_ids(path: str | Path, tokenizer=None) -> list[int]:
    """End-of-sequence ids: generation_config.json, then config.json, then the tokenizer's EOS.

    Stored ids outside the tokenizer's vocabulary are dropped, unless that would drop them all.
    """
    eos = stored_eos_token_id(path)
    if eos is not None:
        ids = [eos] if isinstance(eos, int) else [int(i) for i in eos]
        vocab = tokenizer.vocab_size if tokenizer is not None else None
        return [i for i in ids if vocab is None or 0 <= i < vocab] or ids
    if tokenizer is not None and tokenizer.eos_id is not None:
        return [tokenizer.eos_id]
    return []


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **tokens: str) -> str:
    """A chat template (jinja2, as transformers renders it) applied to a list of {role, content} messages."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 comes with transformers
        raise ConfigError("chat templates need the jinja2 package: pip install jinja2") from None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)  # used by some templates, as in transformers
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)
    except TemplateError as e:
        raise ConfigError(f"the chat template failed: {e}") from None
