"""The language-model recipe: presets, data, training (and resuming), evaluation, inspection.

`moekit train`, `moekit generate` (for moekit checkpoints) and `moekit inspect`
call into this file. A run's resolved `RunConfig` is saved in every
checkpoint, so `load_lm(path)` rebuilds the model from the directory alone;
a resume takes that config, with only the overrides in RESUME_OVERRIDES.

The text and mixed-modal recipes are registered here (`TextRecipe`,
`MixedModalRecipe`); `train_lm` and `inspect_checkpoint` take the run's recipe
from its `data.kind` (recipes.py) and hold no branch on kinds.

Not here: text generation (moekit.infer.Engine), the training loop (loop.py),
the math-task recipe (multitask.py), the registry (recipes.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..checkpoints import load_checkpoint, load_model_state, resolve_checkpoint
from ..config import MoEConfig, _check_choice, _check_int, apply_overrides, from_dict, load_json, to_dict
from ..data.text import Tokenizer, batch_at, encode_corpus, load_corpus
from ..models.build import build_model, load_model
from ..models.decoder import DecoderLM, ModelConfig, count_parameters, experts_per_token, lm_loss
from ..errors import CheckpointError, ConfigError, DataError
from ..moe.stats import LoadTracker
from ..parallel.training import SingleProcess
from .loop import TrainConfig, fit
from .multitask import MathTasksConfig
from .recipes import Answers, LMData, Recipe, recipe_for, register


@dataclass
class DataConfig:
    path: str | None = None  # None: the Python standard library's source
    max_bytes: int = 4_000_000
    tokenizer: str = "byte"  # byte | bpe
    bpe_vocab_size: int = 2048
    kind: str = "text"  # text | mixed_modal (text + VQ-tokenized digit images, moekit.data.mixed_modal) | math_tasks
    vq_patch: int = 2  # mixed_modal: image patch size (8x8 digits: 2 or 4)
    vq_codes: int = 64  # mixed_modal: codebook size (image token ids follow the text vocabulary)
    vq_path: str | None = None  # mixed_modal: a saved codebook (vq.json) instead of training one
    math: MathTasksConfig = field(default_factory=MathTasksConfig)  # kind=math_tasks: tasks, sizes, mixing

    def __post_init__(self) -> None:
        recipe_for(self.kind)  # one of the registered kinds (recipes.py)
        _check_int(self, "max_bytes", 1)
        _check_choice(self, "tokenizer", ("byte", "bpe"))
        _check_int(self, "bpe_vocab_size", 257)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)


def _preset_tiny() -> RunConfig:
    moe = MoEConfig(num_experts=4, top_k=2, expert_hidden=96)
    model = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=256, dense_hidden=192, moe=moe)
    train = TrainConfig(steps=40, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, eval_every=20, eval_batches=2, save_every=20)
    return RunConfig(model, train, DataConfig(max_bytes=400_000))


def _preset_small() -> RunConfig:
    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden=256)
    model = ModelConfig(hidden_size=192, num_layers=4, num_heads=6, num_kv_heads=2, max_seq_len=512, dense_hidden=512, moe=moe)
    train = TrainConfig(steps=800, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=40, eval_every=200, eval_batches=8, save_every=200)
    return RunConfig(model, train, DataConfig(max_bytes=4_000_000))


def _preset_moma_small() -> RunConfig:
    """MoMa 4 text + 4 image experts (expert choice, causal auxiliary routers) on mixed-modal data."""
    moe = MoEConfig(num_experts=8, expert_hidden=256, router="expert_choice", capacity_factor=1.0, num_groups=2,
                    group_sizes=[4, 4], score_func="sigmoid", aux_router_hidden=64)
    cfg = _preset_small()
    return replace(cfg, model=replace(cfg.model, moe=moe), data=DataConfig(kind="mixed_modal", max_bytes=1_000_000))


def _preset_math_tasks() -> RunConfig:
    """JiuZhang 2.0 at small scale: the five-task math suite, task-conditioned routing (moe/task_routing.py)."""
    moe = MoEConfig(num_experts=8, top_k=2, expert_hidden=128, router="task", num_groups=5)
    model = ModelConfig(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2, max_seq_len=128, dense_hidden=256, moe=moe)
    train = TrainConfig(steps=1500, batch_size=32, seq_len=96, lr=3e-3, warmup_steps=50, eval_every=500, eval_batches=4,
                        save_every=500)
    return RunConfig(model, train, DataConfig(kind="math_tasks", math=MathTasksConfig(task_temperature=2.0)))


def _pr_moe_model(hidden, layers, heads, kv_heads, width, experts, stage_layers, freq=1, seq=512) -> ModelConfig:
    """A PR-MoE (DeepSpeed-MoE): Residual-MoE layers (dense MLP + one routed expert, top-1), a pyramid of experts."""
    # Gate weights are the router's probabilities, not renormalised: a renormalised top-1 weight is always 1,
    # which cuts the router off from the language-model loss.
    moe = MoEConfig(num_experts=max(experts), top_k=1, expert_hidden=width, norm_topk_prob=False)
    return ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, max_seq_len=seq,
                       ffn="residual_moe", dense_hidden=width, moe_layer_freq=freq, pyramid=list(experts),
                       pyramid_layers=list(stage_layers), moe=moe)


def _preset_pr_moe() -> RunConfig:
    """The `small` run as a PR-MoE: 8 experts in the first 3 of 4 layers, 16 in the last."""
    base = _preset_small()
    return replace(base, model=_pr_moe_model(192, 4, 6, 2, 512, [8, 16], [3, 1]))


def _preset_pr_moe_350m() -> RunConfig:
    """DeepSpeed-MoE's 350M+PR-MoE-32/64 shape: 24 layers, MoE every other one, 32 experts in the first 10, 64 in the last 2."""
    model = _pr_moe_model(1024, 24, 16, 16, 4096, [32, 64], [20, 4], freq=2, seq=2048)
    train = TrainConfig(steps=20_000, batch_size=32, seq_len=1024, lr=3e-4, warmup_steps=500, eval_every=1000,
                        save_every=1000, precision="bf16")
    return RunConfig(model, train, DataConfig(tokenizer="bpe", bpe_vocab_size=32_000, max_bytes=1_000_000_000))


PRESETS = {"tiny": _preset_tiny, "small": _preset_small, "pr-moe": _preset_pr_moe, "pr-moe-350m": _preset_pr_moe_350m,
           "moma-small": _preset_moma_small, "math_tasks": _preset_math_tasks}


def resolve_run_config(preset: str | None = None, config_file: str | None = None, overrides=(), data: str | None = None) -> RunConfig:
    """Defaults < preset < config file < key=value overrides < --data."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: accepted presets are {', '.join(PRESETS)}")
    # A config file is complete once loaded (missing keys take class defaults), so it replaces the preset.
    cfg = load_json(RunConfig, config_file) if config_file else PRESETS[preset or "small"]()
    cfg = apply_overrides(cfg, list(overrides))
    if data is not None:
        cfg = replace(cfg, data=replace(cfg.data, path=str(data)))
    return cfg


# ---------------------------------------------------------------- data


def prepare_data(cfg: DataConfig, seq_len: int, tokenizer: Tokenizer | None = None) -> LMData:
    """The data of `cfg.kind`'s recipe (a text corpus, mixed-modal streams or a math suite)."""
    return recipe_for(cfg.kind).prepare(cfg, seq_len, tokenizer)


# ---------------------------------------------------------------- the text and mixed-modal recipes


@register("text")
class TextRecipe(Recipe):
    """A text corpus (a file, a folder or the standard library's source), byte-level or BPE tokens."""

    sample = True

    def prepare(self, data_cfg, seq_len, tokenizer=None) -> LMData:
        corpus = load_corpus(data_cfg.path, data_cfg.max_bytes)
        if tokenizer is None:
            tokenizer = Tokenizer.byte_level() if data_cfg.tokenizer == "byte" else \
                Tokenizer.train_bpe(corpus.train, data_cfg.bpe_vocab_size)
        train, val = encode_corpus(tokenizer, corpus.train), encode_corpus(tokenizer, corpus.val)
        if val.numel() < seq_len + 1:  # a tiny corpus: evaluate on the training text rather than fail
            val = train
        return LMData(tokenizer, train, val, corpus.source)

    def step_fns(self, cfg, data, parallel, out, answers=None):
        return _lm_step_fns(cfg, data, parallel, out)

    def inspect(self, model, tokenizer, cfg, ckpt_dir, heatmap, batches, answers=None) -> dict:
        data = self.prepare(replace(cfg.data, max_bytes=min(cfg.data.max_bytes, 1_000_000)), cfg.train.seq_len, tokenizer)
        result = evaluate(model, data.val, cfg.train, cfg.model, batches)
        tracker: LoadTracker = result["tracker"]
        plot = tracker.plot(heatmap or ckpt_dir / "expert_load.png", f"expert load, {ckpt_dir.name}") if tracker.counts else None
        return {"val_loss": result["val_loss"], "layers": tracker.summary_rows(), "summary": tracker.summary(),
                "heatmap": plot, "checkpoint": ckpt_dir}


@register("mixed_modal")
class MixedModalRecipe(TextRecipe):
    """Text + VQ-tokenized digit images (moekit.data.mixed_modal); the model takes the modality id ranges."""

    sample = False  # a continuation of "def " says little about an image-and-caption model

    def prepare(self, data_cfg, seq_len, tokenizer=None) -> LMData:
        from ..data.mixed_modal import prepare_lm_data

        return LMData(**prepare_lm_data(data_cfg, tokenizer))


def _lm_step_fns(cfg: RunConfig, data: LMData, parallel, out: Path):
    """(batch_fn, loss_fn, eval_fn) of next-token training on token streams, with expert-load tracking."""
    tc = cfg.train

    def batch_fn(i):
        return batch_at(data.train, i, tc.batch_size, tc.seq_len, tc.seed)

    def loss_fn(m, batch):
        x, y = batch
        out_ = m(x)
        loss, parts = lm_loss(out_, y, tc.balance_loss_weight, tc.z_loss_weight)
        tracker = LoadTracker()
        tracker.add(out_.routings)
        parallel.sum_load(tracker)
        return loss, {**{k: float(v.detach()) for k, v in parts.items()}, "max_over_mean_load": tracker.max_over_mean()}

    def eval_fn(m, step):
        result = evaluate(m, data.val, tc, cfg.model, parallel=parallel)
        if parallel.is_main and result["tracker"].counts:  # a dense model has no expert load
            result["tracker"].plot(out / "expert_load.png", f"expert load, step {step}")
        return {"val_loss": result["val_loss"], "val_max_over_mean_load": result["tracker"].max_over_mean()}

    return batch_fn, loss_fn, eval_fn


# ---------------------------------------------------------------- training


def train_lm(cfg: RunConfig | None, out_dir: str | Path, resume: bool = False, progress: bool = True,
             expert_parallel: int = 0, resume_overrides=(), answers: Answers | None = None) -> dict:
    """Train (or resume) a DecoderLM run; returns a summary with the checkpoint path.

    resume=True ignores `cfg`: the run continues with the config saved in its
    last checkpoint, changed only by `resume_overrides` (keys in RESUME_OVERRIDES,
    e.g. "train.steps=2000" to extend a finished run).

    expert_parallel=N (under torchrun): experts sharded over N ranks, the batch
    split over all ranks (see moekit.parallel); metrics and checkpoints are
    those of one process, and the returned model is the full, unsharded one.

    answers: greedy answers for a math_tasks run's exact match (moekit.infer.answers.greedy_answers;
    None: its evaluations report the validation loss only).
    """
    if not expert_parallel:
        return _train_lm(cfg, Path(out_dir), resume, progress, SingleProcess(), resume_overrides, answers)
    from ..parallel import init_expert_parallel

    with init_expert_parallel(expert_parallel) as parallel:
        return _train_lm(cfg, Path(out_dir), resume, progress, parallel, resume_overrides, answers)


def _run_data(cfg: RunConfig, tokenizer: Tokenizer | None) -> tuple[RunConfig, LMData]:
    """The run's data (its recipe's), and its config with what the data fixes in the model filled in."""
    recipe = recipe_for(cfg.data.kind)
    data = recipe.prepare(cfg.data, cfg.train.seq_len, tokenizer)
    check_corpus_size(data, cfg.train.seq_len)  # before the run directory exists: a refusal leaves nothing on disk
    model = recipe.model_config(cfg.model, cfg.data)
    return replace(cfg, model=replace(model, vocab_size=data.tokenizer.vocab_size, **data.model_overrides)), data


def _train_lm(cfg: RunConfig | None, out: Path, resume: bool, progress: bool, parallel, resume_overrides=(),
              answers: Answers | None = None) -> dict:
    if resume:
        cfg = resume_run_config(out, resume_overrides)
    elif cfg is None:
        raise ConfigError("train_lm needs a RunConfig (cfg=None is only accepted with resume=True)")
    elif out.exists() and any(out.glob("step-*")):
        raise ConfigError(f"{out} already holds a training run: pass --resume to continue it, or choose another --out")
    tc = cfg.train
    tokenizer = Tokenizer.from_file(resolve_checkpoint(out)) if resume else None
    cfg, data = _run_data(cfg, tokenizer)
    if tc.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    torch.manual_seed(tc.seed)
    model = build_model(cfg.model)  # the config's transforms too (pre-gated routing), so a resumed run is the same model
    parallel.check_same(to_dict(cfg), "config")
    if parallel.sharded:
        from ..parallel import apply_expert_parallel

        apply_expert_parallel(model, parallel)
    batch_fn, loss_fn, eval_fn = recipe_for(cfg.data.kind).step_fns(cfg, data, parallel, out, answers)
    started = time.perf_counter()
    result = fit(
        model, tc, batch_fn=batch_fn, loss_fn=loss_fn, eval_fn=eval_fn, run_dir=out, config_dict=to_dict(cfg),
        tokenizer=data.tokenizer, resume=resume, progress=progress, tokens_per_batch=tc.batch_size * tc.seq_len,
        parallel=parallel,
    )
    _save_data_files(data, out, parallel)
    if parallel.sharded:  # hand back an ordinary single-process model holding every expert
        full_state = parallel.full_state_dict(model)
        model = build_model(cfg.model)
        load_model_state(model, full_state)
    return {
        "model": model, "tokenizer": data.tokenizer, "result": result, "config": cfg,
        "seconds": time.perf_counter() - started, "source": data.source,
        "is_main": parallel.is_main,
    }


def check_corpus_size(data: LMData, seq_len: int) -> None:
    """Refuse a corpus whose training or validation split is shorter than one window of seq_len + 1 tokens."""
    if data.train is None:  # generated rows (math_tasks), no corpus
        return
    need = seq_len + 1
    train, val = data.train.numel(), data.val.numel()
    if min(train, val) < need:
        raise DataError(f"the corpus {data.source} is too small: {train + val} tokens ({train} for training, {val} "
                        f"for validation), and train.seq_len={seq_len} needs at least {need} in each; use more data "
                        f"or a shorter train.seq_len")


def _save_data_files(data: LMData, out: Path, parallel) -> None:
    """What the data needs again at inference (e.g. the mixed-modal VQ codebook), beside the checkpoints."""
    for name, obj in data.files.items() if parallel.is_main else ():
        obj.save(out / name)


@torch.no_grad()
def evaluate(model: DecoderLM, tokens: torch.Tensor, tc: TrainConfig, mcfg: ModelConfig, batches: int | None = None,
             parallel=None) -> dict:
    """Mean validation loss over a fixed set of batches, and the expert load seen on them.

    With `parallel` (an expert-parallel model) each rank evaluates its slice of every batch.
    """
    parallel = parallel if parallel is not None else SingleProcess()
    was_training = model.training
    model.eval()
    tracker, losses = LoadTracker(), []
    seq_len = min(tc.seq_len, mcfg.max_seq_len)
    device = next(model.parameters()).device
    for i in range(batches or tc.eval_batches):
        x, y = batch_at(tokens, i, tc.batch_size, seq_len, seed=tc.seed + 1_000_003)
        x, y = parallel.shard_batch((x.to(device), y.to(device)))
        out = model(x)
        losses.append(float(torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())))
        tracker.add(out.routings)
    losses = parallel.mean_over_ranks(losses)
    parallel.sum_load(tracker)
    model.train(was_training)
    return {"val_loss": sum(losses) / len(losses), "tracker": tracker}


# Overrides a resume accepts: they change how long the run goes on and what it evaluates and keeps, never what
# it computes up to the checkpoint. train.steps is also the end of the LR schedule (warmup + cosine to train.steps).
RESUME_OVERRIDES = ("train.steps", "train.eval_every", "train.eval_batches", "train.save_every", "train.keep_last")


def resume_run_config(out: str | Path, overrides=()) -> RunConfig:
    """The saved config of the run in `out` with `overrides` applied; refuses a run with nothing left to do."""
    out = Path(out)
    _check_has_checkpoint(out)
    ckpt = load_checkpoint(resolve_checkpoint(out))
    cfg = run_config_from(ckpt.config, ckpt.dir)
    cfg = apply_overrides(cfg, [_check_resume_override(item) for item in overrides])
    step, steps = int(ckpt.trainer_state.get("step", 0)), cfg.train.steps
    if step >= steps:
        raise ConfigError(f"the run in {out} is complete (at step {step} of {steps}): nothing to resume; to train it "
                          f"further, raise its step count, e.g. --resume train.steps={max(2 * step, step + 1)}")
    return cfg


def _check_resume_override(item: str) -> str:
    key = item.split("=", 1)[0].strip()
    full = key if key.startswith("train.") else f"train.{key}"
    if "=" not in item or full not in RESUME_OVERRIDES:
        raise ConfigError(f"override {item!r} cannot be used with --resume (it would change what the saved run "
                          f"computes); accepted with --resume: {', '.join(k + '=...' for k in RESUME_OVERRIDES)}")
    return f"{full}={item.split('=', 1)[1]}"


def _check_has_checkpoint(out: Path) -> None:
    """A missing run, or one killed before its first checkpoint, gets a message saying how to start it."""
    if not out.exists():
        raise CheckpointError(f"there is no run in {out} to resume (it does not exist): start it without --resume")
    if out.is_dir() and _holds_only_logs(out):
        raise CheckpointError(f"{out} holds no checkpoint yet (the run stopped before its first save, so there is "
                              f"nothing to resume): start the run again without --resume")


def _holds_only_logs(out: Path) -> bool:
    """True for an empty directory, or one with metrics or plots only: nothing a checkpoint check would name."""
    return all(p.is_file() and p.name in ("metrics.jsonl", "expert_load.png") for p in out.iterdir())


def run_config_from(data: dict, where: Path | str) -> RunConfig:
    if not isinstance(data, dict) or "model" not in data:
        raise CheckpointError(f"{where} is not a moekit language-model checkpoint: its config.json has no 'model' section")
    # A quantized checkpoint's "quantization" section describes its weights, not the run (moekit.quantize);
    # a distilled student's "distill" section its teacher and KD settings (moekit.train.distill).
    data = {k: v for k, v in data.items() if k not in ("quantization", "distill")}
    return from_dict(RunConfig, data, f"{where}/config.json")


# ---------------------------------------------------------------- loading, inspecting


def load_lm(path: str | Path) -> tuple[DecoderLM, Tokenizer, RunConfig]:
    """A trained model, its tokenizer and config from a run or checkpoint directory."""
    model, tokenizer, config = load_model(path)
    return model, tokenizer, run_config_from(config, path)


def inspect_checkpoint(path: str | Path, heatmap: str | Path | None = None, batches: int = 4,
                       answers: Answers | None = None) -> dict:
    """Parameter counts, and what the run's recipe reports (expert load on validation data; writes the heatmap).

    answers: greedy answers for a math_tasks model's exact match (as in `train_lm`).
    """
    model, tokenizer, cfg = load_lm(path)
    counts = count_parameters(model)
    # the validation loss is over `batches` batches; training's (metrics.jsonl) over train.eval_batches
    head = {"params": counts, "param_rows": parameter_rows(model), "batches": batches,
            "train_eval_batches": cfg.train.eval_batches}
    recipe = recipe_for(cfg.data.kind)
    return {**head, **recipe.inspect(model, tokenizer, cfg, resolve_checkpoint(path), heatmap, batches, answers)}


def parameter_rows(model: DecoderLM) -> list[dict]:
    """Total and per-token active parameters of each part: embeddings, every layer, final norm + head.

    A token uses top_k of an MoE layer's experts, so a layer's active count is
    its total less the weights of the (num_experts - top_k) experts it skips.
    The rows add up to `count_parameters(model)` (tied embeddings counted once).
    """
    tied = model.embed_tokens.weight

    def numel(module) -> int:  # quantized weights are buffers; they count as the weights they stand for
        quantized = sum(m.num_weights for m in module.modules() if getattr(m, "quantized_weights", False))
        return quantized + sum(p.numel() for p in module.parameters() if module is model.embed_tokens or p is not tied)

    rows = [{"part": "embeddings", "ffn": "", "experts": 0, "top_k": 0, "total": numel(model.embed_tokens)}]
    for i, layer in enumerate(model.layers):
        moe = getattr(layer.mlp, "moe", layer.mlp)  # ResidualMoE holds its MoELayer as .moe
        kind = model.cfg.ffn if layer.is_moe else "dense"
        E, k = (moe.cfg.num_experts, experts_per_token(moe.cfg)) if layer.is_moe else (0, 0)  # (as count_parameters)
        rows.append({"part": f"layer {i}", "ffn": kind, "experts": E, "top_k": k, "total": numel(layer)})
        if layer.is_moe:
            rows[-1]["active"] = rows[-1]["total"] - (E - k) * (moe.experts.num_weights // E)
    head = numel(model.norm) + numel(model.lm_head)
    rows.append({"part": "norm + head", "ffn": "", "experts": 0, "top_k": 0, "total": head})
    for row in rows:
        row.setdefault("active", row["total"])
    return rows
