"""`moekit generate` and `moekit convert`: flags, one library call each, printing.

generate drives `moekit.infer.Engine`, loaded by the flags it shares with
`moekit serve` (loading_flags.py: --dtype, --device, --quantize, --expert-budget, ...);
--task gives a task-routed model (data.kind=math_tasks) its task id;
convert calls `moekit.hf.convert`. Sampling flags default to None, meaning
"the library's default": the defaults are defined once, in
`moekit.infer.sampling.SamplingConfig`, and `moekit generate --help` reads them
from there. Heavy imports happen inside the handlers (and in the help
formatter). Not here: sampling, offloading, the Hugging Face layouts, the
parser itself (main.py).
"""

from __future__ import annotations

import argparse

from .loading_flags import add_loading_flags

HF_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "granitemoe", "phimoe", "gpt_oss")  # = moekit.hf.SUPPORTED_MODEL_TYPES (not imported: torch)
SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")  # SamplingConfig fields; None = its default


class _LibraryDefaults(argparse.HelpFormatter):
    """Shows SamplingConfig's default for the sampling flags (imported only when this help is printed)."""

    def _get_help_string(self, action):
        if action.dest in SAMPLING_FLAGS and action.default is None:
            from ..infer.sampling import SamplingConfig

            return f"{action.help} (default {getattr(SamplingConfig, action.dest)})"
        return action.help


def sampling_settings(args) -> dict:
    """The sampling flags the user gave; the others take SamplingConfig's defaults."""
    given = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    return {**given, "stop_strings": args.stop or []}


def _generate(args) -> int:
    from ..errors import ConfigError
    from ..infer.engine import check_settings
    from .loading_flags import check_loading_flags, engine_from_flags

    settings = check_settings(**sampling_settings(args))
    if args.prompt is None and args.cache == "belady":
        raise ConfigError("--cache belady replays the prompt to learn the future: give --prompt (it has no chat mode)")
    check_loading_flags(args)
    _read_prompt(args)
    engine = engine_from_flags(args)  # the same loading as `moekit serve` (loading_flags.py)
    group = _task_group(engine, args.task)
    if args.prompt is None:  # no --prompt: an interactive chat (chat_repl.py)
        from .chat_repl import chat_repl

        return chat_repl(engine, settings, args.system, group_ids=group)
    prompt = engine.encode(args.prompt, chat=args.chat, system=args.system)
    if args.chat:
        settings.stop_strings = [*settings.stop_strings, *engine.chat_stops()]  # as the server's chat endpoint
    engine.check_prompts([prompt])
    _note_clipped(engine, prompt, settings)
    if args.cache == "belady":
        _belady(engine, args, prompt, settings, group)
    if not args.chat:
        print(args.prompt, end="", flush=True)

    def stream(index: int, token: int, text: str) -> None:
        print(text, end="", flush=True)

    engine.generate_ids([prompt], settings, on_token=stream, group_ids=group)
    print()
    if args.stats:
        _print_stats(engine)
    return 0


def _task_group(engine, task) -> int | None:
    """--task's group id (a name of the run's tasks, or an id); one clear error when the model needs one and has none."""
    if task is not None:
        return engine.task_group(task)
    if engine.needs_groups:
        from ..errors import ConfigError

        known = f" ({', '.join(engine.tasks)})" if engine.tasks else ""
        raise ConfigError(f"this model routes every token by its task or group (moe.router="
                          f"{engine.model.cfg.moe.router!r}): give --task NAME{known} or --task ID "
                          f"(0..{engine.model.cfg.moe.num_groups - 1})")
    return None


def _note_clipped(engine, prompt, settings) -> None:
    """One stderr line when --max-new-tokens asks for more than the context leaves after the prompt."""
    import sys

    context = engine.model.cfg.max_seq_len
    room = context - len(prompt)
    if settings.max_new_tokens > room:
        print(f"note: --max-new-tokens {settings.max_new_tokens} is more than the context leaves: the prompt has "
              f"{len(prompt)} tokens and the context is {context}, so at most {room} new tokens",
              file=sys.stderr, flush=True)


def _read_prompt(args) -> None:
    """--prompt - reads the prompt from stdin (less one final newline); --system needs --chat."""
    import sys

    from ..errors import ConfigError

    if args.system is not None and not args.chat and args.prompt is not None:  # (no --prompt: a chat, --system fits)
        raise ConfigError("--system is the system message of a chat: add --chat (the model's chat template), or drop "
                          "--system")
    if args.prompt == "-":
        text = sys.stdin.read()
        args.prompt = text[:-1] if text.endswith("\n") else text
        if not args.prompt:
            raise ConfigError("--prompt -: the prompt read from stdin is empty")


def _belady(engine, args, prompt, settings, group) -> None:
    """--cache belady needs the future: a silent first pass (same prompt and seed, so the same tokens) records the
    routing, then the cache switches to Belady over it."""
    offloader = engine.offloader
    engine.generate_ids([prompt], settings, group_ids=group)
    offloader.configure(args.expert_budget, "belady", args.prefetch or "none", trace=offloader.trace, pregate=args.pregate)


def _print_stats(engine) -> None:
    stats = engine.last_stats
    if stats.get("offload"):
        from ..infer.offload import format_stats

        print(format_stats(stats["offload"], stats))
    else:
        print(f"{stats['new_tokens']} new tokens; prefill {1000 * stats['prefill_s']:.1f} ms, "
              f"decode {stats['decode_tokens_per_s']:.2f} tokens/s")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a Hugging Face model directory or a moekit checkpoint",
                       formatter_class=_LibraryDefaults)
    p.add_argument("model", help="a GGUF file, a Hugging Face model directory (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, Granite-MoE, PhiMoE, GPT-OSS), a moekit run/checkpoint or a moefy output")
    p.add_argument("--prompt", help="the text to continue; - reads it from stdin; left out: an interactive chat "
                                     "(one line a turn, with history, the chat template; /reset, /exit)")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: the smallest set with probability >= p (1 = all)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--repetition-penalty", type=float, help="divide the logits of tokens already in the prompt or "
                   "the text by this (multiply when negative; as transformers; > 1 discourages repeats, 1 = off)")
    p.add_argument("--presence-penalty", type=float, help="subtract this from the logit of every token generated "
                   "so far (as OpenAI; -2..2 there, 0 = off)")
    p.add_argument("--frequency-penalty", type=float, help="subtract this times the count of each token generated "
                   "so far (as OpenAI; -2..2 there, 0 = off)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop when this text appears (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the model's chat template")
    p.add_argument("--system", help="a system message (with --chat only)")
    p.add_argument("--task", "--group-id", metavar="NAME|ID",
                   help="the task (or group) every token is routed by, for a task-routed model (data.kind=math_tasks: "
                        "one of the run's task names, or its id)")
    add_loading_flags(p)  # --dtype, --device, --quantize, --expert-budget, ... (the same as `moekit serve`)
    p.add_argument("--stats", action="store_true", help="print decode speed and (when offloading) cache and transfer statistics")
    p.set_defaults(handler=_generate)


def _convert(args) -> int:
    from .paths import out_dir, out_file

    if args.to == "gguf":
        out_file(args.out_dir, "out_dir", example="model.gguf")
    else:
        out_dir(args.out_dir, "out_dir")
    if args.to == "gguf":  # --- GGUF (moekit.gguf)
        from ..gguf import convert as to_gguf

        out = to_gguf(args.checkpoint, args.out_dir, dtype=args.gguf_type, arch=args.arch)
        print(f"wrote a GGUF ({args.gguf_type}) model to {out}")
        return 0
    from ..hf import convert

    out = convert(args.checkpoint, args.out_dir, arch=args.arch)
    print(f"wrote a Hugging Face model to {out}")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write a moekit checkpoint as a Hugging Face model directory")
    p.add_argument("checkpoint", help="a moekit run directory or one of its step-* checkpoints (--to gguf: or a Hugging Face directory)")
    p.add_argument("out_dir", help="the new Hugging Face model directory (must not exist or be empty)")
    p.add_argument("--to", required=True, choices=["hf", "gguf"],
                   help="the target format: hf (Hugging Face transformers) or gguf (llama.cpp; out_dir is then the .gguf file)")
    p.add_argument("--gguf-type", default="F32", choices=["F32", "F16", "Q8_0", "Q4_0"], help="GGUF weight type (default F32)")
    p.add_argument("--arch", default="auto", choices=["auto", *HF_ARCHS],
                   help="the Hugging Face family to write (default: the first one the model fits)")
    p.set_defaults(handler=_convert)


def add_parsers(sub) -> None:
    """Register generate and convert on the `moekit` subparsers."""
    _add_generate(sub)
    _add_convert(sub)


__all__ = ["add_parsers", "sampling_settings", "HF_ARCHS"]
