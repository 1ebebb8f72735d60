"""The generation engine: prefill and decode with a preallocated KV cache.

`Engine` wraps a loaded model (`moekit.infer.load.load`'s `Loaded` record:
a DecoderLM of any format and its tokenizer, or a bare DecoderLM). `generate` takes a batch of prompts of
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

Not here: loading any format (load.py), sampling rules and setting checks
(sampling.py).

Shape legend: B batch, P padded prompt length, T new tokens, D hidden,
V vocabulary, K top-k, d head_dim.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..models.decoder import DecoderLM
from ..errors import ConfigError
from .load import Loaded
from .sampling import Penalties, SamplingConfig, make_generator, next_tokens, sampling_config
from .sequence import Completion, SequenceState, TokenCallback
from .threads import ThreadTuner


class Engine:
    """Batched generation from a loaded model (`moekit.infer.load.load`'s record, or a bare DecoderLM)."""

    def __init__(self, loaded: Loaded | DecoderLM, tokenizer=None, stop_token_ids: Sequence[int] | None = None,
                 chat_template: str | None = None, special_tokens: dict[str, str] | None = None,
                 chat_fallback: bool = False) -> None:
        """Engine(load(path, ...)) takes the record as it is; Engine(model, tokenizer, ...) wraps a bare model
        (the other arguments are the record's fields, for a model built or transformed in memory)."""
        if not isinstance(loaded, Loaded):
            loaded = Loaded(loaded, tokenizer, None if stop_token_ids is None else list(stop_token_ids),
                            chat_template, dict(special_tokens or {}), chat_fallback)
        elif tokenizer is not None or stop_token_ids is not None or chat_template or special_tokens or chat_fallback:
            raise ConfigError("Engine(loaded) takes the loaded record as it is: give the tokenizer, stop ids and "
                              "chat settings to Engine(model, ...) instead")
        model = loaded.model
        self.model = model.eval()
        self.tokenizer = tokenizer = loaded.tokenizer
        stop_token_ids = loaded.stop_token_ids
        if stop_token_ids is None:
            eos = getattr(tokenizer, "eos_id", None)
            stop_token_ids = [eos] if eos is not None else []
        self.stop_token_ids = list(stop_token_ids)
        self.chat_template = loaded.chat_template
        self.special_tokens = dict(loaded.special_tokens)
        self.chat_fallback = loaded.chat_fallback  # chat without a template: the fallback format (chat.py; moekit checkpoints)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.path: Path | None = loaded.path  # where the model was loaded from (the disk tier of `offload` reads it)
        self.tasks = loaded.tasks  # a multi-task run's task names: group_ids=index (see `task_group`)
        self.offloader = loaded.offloader  # set by loading with an expert budget, or by `offload`
        self.last_stats: dict = {}  # timing (and offloading statistics) of the latest generate call
        self.adapt_threads = True  # CPU decode: each step's thread count follows measured step times (threads.py)

    # ------------------------------------------------------------ construction

    @classmethod
    def load(cls, path: str | Path, dtype=None, device=None, expert_budget=None, quantize: str | None = None,
             **offload_options) -> "Engine":
        """An engine for a model of any format: `Engine(moekit.infer.load.load(path, ..., lazy=True))`.

        A Hugging Face model directory, a moekit run/checkpoint (quantized or pre-gated ones too), a GGUF
        file or a moefy output. expert_budget ("25%", 0.25, "2GB", bytes; None = all resident) offloads the
        experts (`offload_options`: tier, policy, predictor, low_bit_fallback, spill_dir, ...) lazily: they
        are never read into memory, but go straight from the checkpoint's files (or the GGUF file's memory
        map) into the fast slots, so the tier is the disk one. (`load` with lazy=None, as `moekit generate`
        and `moekit serve` call it, picks the device's default tier and loads whole for any other.)
        quantize="int8" | "int4" quantizes the experts at load time. See `moekit.infer.load.load`.
        """
        from .load import load

        return cls(load(path, dtype=dtype, device=device, quantize=quantize, expert_budget=expert_budget,
                        lazy=True if expert_budget is not None else None, **offload_options))

    def task_group(self, task: str | int) -> int:
        """The group id of a task, by name (the task names a multi-task run was trained on) or by id.

        One clear error for a model that routes by no group, an unknown name or an id out of range.
        """
        cfg = self.model.cfg
        if not getattr(cfg, "routes_by_group", False):
            raise ConfigError(f"this model does not route by task or group (moe.router={cfg.moe.router!r}): "
                              f"it takes no task id")
        G = cfg.moe.num_groups
        names = f"a task name ({', '.join(self.tasks)}) or " if self.tasks else ""
        if isinstance(task, str) and task in self.tasks:
            return self.tasks.index(task)
        if isinstance(task, str) and task.strip().lstrip("-").isdigit():
            task = int(task)
        if isinstance(task, int) and not isinstance(task, bool) and 0 <= task < G:
            return task
        raise ConfigError(f"task {task!r} is not one this model knows: give {names}an id in 0..{G - 1}")

    @property
    def needs_groups(self) -> bool:
        """True when every prompt needs a group (task) id: the routers read one and no token ranges give it."""
        cfg = self.model.cfg
        return bool(getattr(cfg, "routes_by_group", False)) and not getattr(cfg, "group_of_token", None)

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


def check_settings(**settings) -> SamplingConfig:
    """Validate generation settings without running anything (the CLI checks before loading a model)."""
    return sampling_config(**settings)


__all__ = ["Engine", "Completion", "SamplingConfig", "check_settings"]
