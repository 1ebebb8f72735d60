"""The generation engine: prefill and decode with a preallocated KV cache.

`Engine` wraps a `DecoderLM` (loaded from a Hugging Face directory or a
moekit checkpoint) and its tokenizer. `generate` takes a batch of prompts of
different lengths, left-pads them, prefills them in one forward pass and
decodes one token per step for every sequence, with greedy, temperature,
top-k and top-p sampling (seeded), repetition, presence and frequency
penalties, stop token ids, stop strings, a token
budget and a streaming callback.

The engine runs the model's own forward (`DecoderLM.forward` with a KV cache
object): prefill writes the prompts into the cache, each decode step feeds one
token per sequence. There is no second copy of the blocks here, so every model
change (a family quirk, a storage transform such as offloading) applies to
generation as it does to training. Speed at small batches comes from the
layers themselves: with no gradients (inference_mode) the routers skip their losses, the
experts' `auto` kernel visits only the chosen experts, RMSNorm is one fused
op, and logits are computed for the last position only.

Not here: sampling rules and setting checks (sampling.py), Hugging Face
files (moekit.hf), moekit checkpoints (moekit.lm / moekit.checkpoints).

Shape legend: B batch, P padded prompt length, T new tokens, D hidden,
V vocabulary, K top-k, d head_dim.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..models.decoder import DecoderLM
from ..errors import ConfigError
from .sampling import Penalties, SamplingConfig, make_generator, next_tokens, sampling_config
from .sequence import Completion, SequenceState, TokenCallback
from .threads import ThreadTuner


def _is_moefy_dir(p: Path) -> bool:
    from ..moefy.io import is_moefy_dir

    return is_moefy_dir(p)


def _quantized(model: DecoderLM, options: dict | None) -> DecoderLM:
    """The model quantized at load time (options for moekit.quantize.quantize_model), or as it is."""
    if options is None:
        return model
    from ..quantize import quantize_model

    return quantize_model(model, **options)


def _load_quantized(load: Callable[[bool], DecoderLM], path: Path, options: dict | None, lazy: bool,
                    per_expert: bool = True) -> DecoderLM:
    """`load(experts)`'s model, quantized at load time by `options` (None: as loaded).

    Resident (not lazy) with options: the model is loaded without its routed experts, quantized (on the
    meta device), then its experts are read one at a time and each quantized as it is read (offloading's
    `load_experts`), so no full-precision copy of all experts ever exists. Experts the disk tier cannot
    read as stored (FP8 blocks, MXFP4 or transposed tensors: per_expert=False from the caller, or an
    OffloadError as the backstop): the whole model is loaded, then quantized.
    """
    if options is None or lazy or not per_expert:
        return _quantized(load(not lazy), options)
    from .offload import OffloadError
    from .offload.transform import load_experts

    model = _quantized(load(False), options)
    try:
        load_experts(model, path)
    except OffloadError:
        del model
        return _quantized(load(True), options)
    return model


class Engine:
    """Batched generation from a DecoderLM and (optionally) its tokenizer."""

    def __init__(self, model: DecoderLM, tokenizer=None, stop_token_ids: Sequence[int] | None = None,
                 chat_template: str | None = None, special_tokens: dict[str, str] | None = None,
                 chat_fallback: bool = False) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        if stop_token_ids is None:
            eos = getattr(tokenizer, "eos_id", None)
            stop_token_ids = [eos] if eos is not None else []
        self.stop_token_ids = list(stop_token_ids)
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.chat_fallback = chat_fallback  # chat without a template: the fallback format (chat.py; moekit checkpoints)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.path: Path | None = None  # where the model was loaded from (the disk tier of `offload` reads it)
        self.offloader = None  # set by `offload`
        self.last_stats: dict = {}  # timing (and offloading statistics) of the latest generate call
        self.adapt_threads = True  # CPU decode: each step's thread count follows measured step times (threads.py)

    # ------------------------------------------------------------ construction

    @classmethod
    def load(cls, path: str | Path, dtype=None, device=None, expert_budget=None, quantize: str | None = None,
             **offload_options) -> "Engine":
        """An engine for a Hugging Face model directory, a moekit run/checkpoint directory or a moefy output.

        expert_budget ("25%", 0.25, "2GB", bytes; None = all resident) loads lazily: the routed experts
        are never read into memory; they stay in the checkpoint's own safetensors files (or the GGUF
        file's memory map) and are read straight into the fast slots (see `offload`, which takes
        `offload_options`: tier, policy, predictor, low_bit_fallback, spill_dir, ...).
        quantize="int8" | "int4" (group 32, symmetric) quantizes the weights at load time
        (moekit.quantize.quantize_model, experts only); a checkpoint written by `moekit quantize`
        comes back quantized without it. With an expert budget too, the experts are offloaded
        quantized: each is quantized as it is read and written to a spill file (the disk tier) one
        at a time, so they never all exist in full precision. A GGUF file runs in its own block formats
        (Q8_0, Q4_0, Q5_0, Q4_K, Q6_K stay resident at their file size: moekit.gguf.storage; with an
        expert budget the slots hold the blocks too); with quantize= it is dequantized with gguf's
        routines instead, then requantized to moekit's format.
        """
        from .. import hf
        from .chat import load_chat_template, special_tokens, stop_token_ids

        options = None
        if quantize is not None:  # (moekit.quantize brings numba: 0.5 s and ~90 MB, only when asked for)
            from ..quantize import load_time_options

            options = load_time_options(quantize)  # a bad name is refused before anything is read
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"model path {p} does not exist: give a Hugging Face model directory or a moekit checkpoint")
        if offload_options and expert_budget is None:
            raise ConfigError(f"{', '.join(sorted(offload_options))} only apply with an expert budget (expert_budget=...)")
        lazy = expert_budget is not None
        if p.suffix == ".gguf" or p.is_file():  # --- GGUF (moekit.gguf): its block formats kept
            engine = cls._load_gguf(p, dtype, device, options, lazy)
        elif _is_moefy_dir(p):  # --- a moefy output: a converted decoder (a Read-ME model routes ahead)
            engine = cls._load_moefy(p, dtype, device, options, lazy)
        elif hf.is_hf_dir(p):
            from ..hf.reader import experts_as_stored

            per_expert = options is not None and not lazy and experts_as_stored(p)
            model = _load_quantized(lambda experts: hf.load(p, dtype=dtype, device=device, experts=experts), p, options,
                                    lazy, per_expert)
            tokenizer = hf.load_tokenizer(p)
            engine = cls(model, tokenizer, stop_token_ids(p, tokenizer), load_chat_template(p), special_tokens(p))
        else:
            from ..models.build import load_model

            tokenizers = []

            def load(experts: bool) -> DecoderLM:
                model, tokenizer, _ = load_model(p, experts=experts)  # a pre-gated model comes back with its routing applied
                _place(model, hf.resolve_device(device), hf.resolve_dtype(dtype))
                tokenizers.append(tokenizer)
                return model

            model = _load_quantized(load, p, options, lazy)
            engine = cls(model, tokenizers[-1], chat_fallback=True)  # no chat template: chat as the server does
        engine.path = p
        if lazy:
            engine.offload(expert_budget, **offload_options)
        return engine

    @classmethod
    def _load_moefy(cls, p: Path, dtype, device, options: dict | None, lazy: bool) -> "Engine":
        """A directory written by `moekit moefy` (a converted decoder; experts left on meta when lazy)."""
        from .. import hf
        from ..moefy.io import load_generator
        from .chat import load_chat_template, special_tokens, stop_token_ids

        model, tokenizer = load_generator(p, experts=not lazy)
        _place(model, hf.resolve_device(device), hf.resolve_dtype(dtype))
        return cls(_quantized(model, options), tokenizer, stop_token_ids(p, tokenizer), load_chat_template(p),
                   special_tokens(p))

    @classmethod
    def _load_gguf(cls, p: Path, dtype, device, options: dict | None, lazy: bool) -> "Engine":
        """A GGUF file: its blocks kept as they are (experts too unless lazy: an expert budget), other tensors as floats.

        quantize=: everything dequantized instead, and without a budget the experts requantized one at a time
        (no full-precision copy of them)."""
        from .. import gguf

        if not gguf.is_gguf(p):
            raise ConfigError(f"model path {p} is a file but not a GGUF file: give a .gguf file, a Hugging Face model directory or a moekit checkpoint")
        per_expert = lazy or options is not None  # requantized: each expert dequantized, then quantized, as it is read
        model = _quantized(gguf.load(p, dtype=dtype, device=device, experts=not per_expert, blocks=options is None), options)
        if per_expert and not lazy:
            from .offload.transform import load_experts

            load_experts(model, p)
        return cls(model, gguf.load_tokenizer(p))

    def offload(self, budget, **options):
        """Keep only `budget` of the experts in fast memory, the rest in a slow tier; returns the Offloader.

        See moekit.infer.offload.offload_model for the options (tier, policy, predictor, low_bit_fallback, ...);
        the disk tier reads the checkpoint the engine was loaded from (quantized experts stay quantized).
        """
        from .offload import offload_model

        options.setdefault("checkpoint", self.path)
        self.offloader = offload_model(self.model, budget, **options)
        return self.offloader

    # ------------------------------------------------------------ text in and out

    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of a prompt; with chat=True the prompt is one user turn under the chat template."""
        tok = self._need_tokenizer()
        if not isinstance(prompt, str):
            raise ConfigError(f"a prompt must be a string, got {type(prompt).__name__}")
        if chat:
            if not self.chat_template and not self.chat_fallback:
                raise ConfigError("this model has no chat template (tokenizer_config.json has no 'chat_template'): drop --chat")
            from .chat import chat_prompt

            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text, special, _ = chat_prompt(messages, self.chat_template, self.special_tokens)
            return tok.backend.encode(text, add_special_tokens=special).ids
        return tok.backend.encode(prompt, add_special_tokens=True).ids

    def chat_stops(self) -> list[str]:
        """Stop strings a chat prompt of `encode` adds (the fallback format's end of the assistant's turn)."""
        from .chat import FALLBACK_STOP

        return [] if self.chat_template else [FALLBACK_STOP]

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], *, chat: bool = False,
                 system: str | None = None, on_token: TokenCallback | None = None, group_ids=None,
                 new_token_groups=None, **settings) -> list[Completion]:
        """Continue each prompt (text, or lists of token ids); settings are SamplingConfig fields (or OpenAI's
        names stop and max_tokens).

        group_ids / new_token_groups: the routers' group ids, as in `generate_ids`.
        """
        cfg = sampling_config(**settings)
        if chat and not self.chat_template:
            cfg.stop_strings = [*cfg.stop_strings, *self.chat_stops()]
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ConfigError("no prompts given: pass at least one prompt")
        if all(isinstance(p, str) for p in prompts):
            ids = [self.encode(p, chat, system) for p in prompts]
        elif all(isinstance(p, (list, tuple)) for p in prompts):
            ids = [list(p) for p in prompts]
        else:
            raise ConfigError("prompts must be all strings or all lists of token ids")
        return self.generate_ids(ids, cfg, on_token, group_ids=group_ids, new_token_groups=new_token_groups)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ConfigError("this model has no tokenizer (no tokenizer.json): pass token ids instead of text")
        return self.tokenizer

    # ------------------------------------------------------------ the loop

    @torch.inference_mode()  # (not no_grad: no view or version bookkeeping on the step's many small tensors)
    def generate_ids(self, prompt_ids: list[list[int]], cfg: SamplingConfig | None = None,
                     on_token: TokenCallback | None = None, group_ids=None, new_token_groups=None) -> list[Completion]:
        """Continue each prompt of token ids.

        group_ids (routers taking a group per token: modality, task): None (the model's `group_of_token`
        ranges, if any), an int, one int per prompt (fixed per request) or one list per prompt (per token).
        Generated tokens get `new_token_groups` (an int, or one per prompt) when given, else the request's
        fixed group, else the model's token ranges, else the group of the prompt's last token.
        """
        cfg = cfg or SamplingConfig()
        model, B = self.model, len(prompt_ids)
        lens = self.check_prompts(prompt_ids)
        P, max_len = max(lens), model.cfg.max_seq_len
        budget = min(cfg.max_new_tokens, max_len - P)
        total = P + budget
        stop_ids = set(self.stop_token_ids if cfg.stop_token_ids is None else cfg.stop_token_ids)
        needs_text = bool(cfg.stop_strings) or on_token is not None
        if needs_text:
            self._need_tokenizer()
        seqs = [SequenceState(i, n, self.tokenizer, cfg.stop_strings) for i, n in enumerate(lens)]
        generator = None if cfg.greedy else make_generator(cfg.seed, self.device)
        penalties = Penalties(cfg, prompt_ids) if cfg.penalized else None

        ids_BP, keep_BK = _left_pad(prompt_ids, P, total, self.device)
        mask_BK = keep_BK if min(lens) < P else None  # left padding: real keys only
        positions_BP = (keep_BK[:, :P].long().cumsum(-1) - 1).clamp_min(0)
        cache = model.new_cache(B, total)
        groups_BP, groups_B1 = request_groups(model.cfg, prompt_ids, P, group_ids, new_token_groups, self.device)

        if self.offloader is not None:
            self.offloader.reset_stats()
        started = time.perf_counter()
        logits_BV = self._step(ids_BP, positions_BP, mask_BK, cache, 0, groups_BP)
        prefilled = time.perf_counter()
        decode_steps = self._decode(logits_BV, seqs, (cfg, generator, penalties, stop_ids, needs_text, on_token),
                                    (positions_BP[:, -1:], mask_BK, cache, P, groups_B1), budget)
        decode_s = time.perf_counter() - prefilled
        self.last_stats = {
            "prompt_tokens": sum(lens), "new_tokens": sum(len(s.ids) for s in seqs),
            "prefill_s": prefilled - started, "decode_s": decode_s,
            "decode_tokens_per_s": B * decode_steps / decode_s if decode_steps else 0.0,
            "offload": self.offloader.stats() if self.offloader is not None else None,
        }
        if needs_text:
            for seq in seqs:
                seq.flush(on_token)
        return [s.result() for s in seqs]

    def _decode(self, logits_BV, seqs, sampling, state, budget: int) -> int:
        """Sample, emit and step until every sequence stops or the budget ends; returns the steps run.

        On the CPU a ThreadTuner picks each step's thread count from measured step times (adapt_threads).
        """
        cfg, generator, penalties, stop_ids, needs_text, on_token = sampling
        pos_B1, mask_BK, cache, P, groups_B1 = state
        tuner = ThreadTuner() if self.adapt_threads and self.device.type == "cpu" else None
        steps = 0
        try:
            for step in range(budget):
                tok_B = next_tokens(logits_BV, cfg, generator, penalties)
                for seq, tok in zip(seqs, tok_B.tolist()):
                    if not seq.done:
                        seq.add(tok, stop_ids, needs_text, on_token)
                if step == budget - 1 or all(s.done for s in seqs):
                    break
                pos_B1 = pos_B1 + 1
                if tuner is not None:
                    tuner.before()
                logits_BV = self._step(tok_B[:, None], pos_B1, mask_BK, cache, P + step, groups_B1)
                if tuner is not None:
                    tuner.after()
                steps += 1
        finally:
            if tuner is not None:
                tuner.restore()
        return steps

    def check_prompts(self, prompt_ids: list[list[int]]) -> list[int]:
        """Prompt lengths, after checking each prompt is non-empty, fits the context and uses known ids."""
        max_len, vocab = self.model.cfg.max_seq_len, self.model.cfg.vocab_size
        lens = []
        for i, p in enumerate(prompt_ids):
            name = f"prompt {i}" if len(prompt_ids) > 1 else "the prompt"
            if len(p) == 0:
                raise ConfigError(f"{name} is empty: it needs at least one token")
            if len(p) >= max_len:
                raise ConfigError(
                    f"{name} has {len(p)} tokens but the model's context is {max_len} tokens "
                    f"(a prompt must be shorter than the context, to leave room for new tokens)"
                )
            bad = [t for t in p if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
            if bad:
                raise ConfigError(f"{name} has token id {bad[0]!r} outside the model's vocabulary [0, {vocab})")
            lens.append(len(p))
        return lens

    def _step(self, ids_BT, positions_BT, mask_BK, cache, start, groups_BT=None) -> torch.Tensor:
        """The model's own forward over new tokens at cache position `start`: next-token logits [B, V]."""
        mask = mask_BK[:, : start + ids_BT.shape[1]] if mask_BK is not None else None
        out = self.model(ids_BT, attention_mask_BK=mask, positions_BT=positions_BT, kv_cache=cache,
                         cache_start=start, group_ids_BT=groups_BT, last_only=True)
        return out.logits[:, -1]


def _left_pad(prompt_ids: list[list[int]], P: int, total: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts left-padded to P tokens [B, P], and which of `total` key positions are real [B, total]."""
    ids_BP = torch.zeros(len(prompt_ids), P, dtype=torch.long)
    keep_BK = torch.ones(len(prompt_ids), total, dtype=torch.bool)
    for b, p in enumerate(prompt_ids):
        ids_BP[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        keep_BK[b, : P - len(p)] = False
    return ids_BP.to(device), keep_BK.to(device)


def request_groups(mcfg, prompt_ids: list[list[int]], P: int, group_ids, new_token_groups, device):
    """(prompt groups [B, P] left-padded with 0, or None; new-token groups [B, 1], or None) by generate_ids' rules."""
    B = len(prompt_ids)
    fixed = _per_request(group_ids, B, "group_ids") if not _is_per_token(group_ids) else None
    groups_BP = None
    if fixed is not None:
        groups_BP = torch.tensor(fixed, dtype=torch.long)[:, None].expand(B, P).clone()
    elif group_ids is not None:
        if len(group_ids) != B or any(len(g) != len(p) for g, p in zip(group_ids, prompt_ids)):
            raise ConfigError("group_ids given per token must hold one list per prompt, as long as the prompt")
        groups_BP = torch.zeros(B, P, dtype=torch.long)
        for b, g in enumerate(group_ids):
            groups_BP[b, P - len(g):] = torch.tensor([int(v) for v in g], dtype=torch.long)
    new = _per_request(new_token_groups, B, "new_token_groups") if new_token_groups is not None else fixed
    if new is None and groups_BP is not None and not mcfg.group_of_token:
        new = groups_BP[:, -1].tolist()  # the group of each prompt's last token
    groups_B1 = torch.tensor(new, dtype=torch.long)[:, None].to(device) if new is not None else None
    return (groups_BP.to(device) if groups_BP is not None else None), groups_B1


def _is_per_token(group_ids) -> bool:
    return isinstance(group_ids, (list, tuple)) and any(isinstance(g, (list, tuple)) for g in group_ids)


def _per_request(groups, B: int, name: str) -> list[int] | None:
    """One int per request from None, an int, or a list of B ints."""
    if groups is None:
        return None
    if isinstance(groups, int) and not isinstance(groups, bool):
        return [groups] * B
    if isinstance(groups, (list, tuple)) and len(groups) == B and all(isinstance(g, int) and not isinstance(g, bool) for g in groups):
        return list(groups)
    raise ConfigError(f"{name}={groups!r} is invalid: give an int, one int per prompt ({B}), or (group_ids) one list per prompt")


def _place(model, device: torch.device, dtype: torch.dtype) -> None:
    """Parameters to `device` and `dtype` (buffers stay: the rotary table is float32); meta ones change dtype only."""
    for param in model.parameters():
        if param.is_meta:
            param.data = torch.empty_like(param, dtype=dtype)
        else:
            param.data = param.data.to(device=device, dtype=dtype)
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and not buf.is_meta:  # (a lazily loaded quantized checkpoint's experts stay on meta)
                module._buffers[name] = buf.to(device)


def check_settings(**settings) -> SamplingConfig:
    """Validate generation settings without running anything (the CLI checks before loading a model)."""
    return sampling_config(**settings)


__all__ = ["Engine", "Completion", "SamplingConfig", "check_settings"]
