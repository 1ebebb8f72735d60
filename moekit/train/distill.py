"""Mixture-of-Students (DeepSpeed-MoE): a smaller student LM distilled from a trained MoE teacher.

The student (fewer layers, a smaller pyramid: any `RunConfig`) is trained with
the generic loop (`fit`: checkpoints, bitwise resume, progress) on

    loss = LM loss + kd_weight * T^2 * KL(teacher || student)

with both distributions softened by the temperature T, for the first
`kd_stop` fraction of the steps; after that the student trains on the LM
loss alone (the paper's staged KD). The teacher's logits are computed on the
fly, under no_grad, on the same batch; nothing is dumped to disk. The
student uses the teacher's tokenizer, so their distributions compare token
by token. The checkpoint config holds the student's RunConfig plus a
"distill" section (teacher checkpoint, KD settings) that resumes read back;
`load_lm` ignores it, so a student is an ordinary moekit LM checkpoint.

Not here: the loop (loop.py), the LM recipe and its data (lm.py), the CLI
(moekit/cli/distill.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoints import load_checkpoint, resolve_checkpoint
from ..config import _check_finite, from_dict, to_dict
from ..data.text import Tokenizer, batch_at
from ..errors import CheckpointError, ConfigError, MoekitError
from ..models.build import build_model
from ..models.decoder import lm_loss
from .lm import RunConfig, check_corpus_size, evaluate, load_lm, prepare_data, resume_run_config
from .loop import fit, resolve_device


@dataclass
class DistillConfig:
    teacher: str = ""  # the teacher's checkpoint directory (resolved to one step when the run starts)
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    kd_stop: float = 0.5  # KD for the first kd_stop fraction of the steps, then LM loss alone

    def __post_init__(self) -> None:
        for name in ("kd_weight", "kd_temperature", "kd_stop"):
            _check_finite(self, name)
        if not 0.0 <= self.kd_stop <= 1.0:
            raise ConfigError(f"--kd-stop={self.kd_stop} is invalid: it must be a fraction of the steps in [0, 1]")
        if self.kd_weight < 0:
            raise ConfigError(f"--kd-weight={self.kd_weight} is invalid: it must be >= 0")
        if not self.kd_temperature > 0:
            raise ConfigError(f"--kd-temperature={self.kd_temperature} is invalid: it must be > 0")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student), p = softmax(logits / T); summed over the vocabulary, mean over tokens."""
    V = student_logits.shape[-1]
    log_s = F.log_softmax(student_logits.float().reshape(-1, V) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float().reshape(-1, V) / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def kd_steps(kd_stop: float, steps: int) -> int:
    """How many optimizer steps (the first ones) use KD: floor(kd_stop * steps)."""
    return math.floor(kd_stop * steps + 1e-9)  # 0.29 * 100 is 28.999...: not one step short


def load_teacher(path: str | Path):
    """(model, tokenizer, RunConfig, checkpoint dir) of the teacher; one clear message if it is no LM checkpoint."""
    try:
        ckpt_dir = resolve_checkpoint(path)
        model, tokenizer, cfg = load_lm(ckpt_dir)
    except MoekitError as e:
        raise CheckpointError(f"the teacher {path} is not a moekit language-model checkpoint: {e}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer, cfg, ckpt_dir


def student_vocab_size(cfg: RunConfig) -> int:
    """The vocabulary the student's config describes: its tokenizer setting (byte: 257; bpe: bpe_vocab_size)."""
    return Tokenizer.byte_level().vocab_size if cfg.data.tokenizer == "byte" else cfg.data.bpe_vocab_size


def check_student(cfg: RunConfig, teacher_cfg: RunConfig, tokenizer: Tokenizer) -> None:
    """Refuse a student that cannot be compared with the teacher token by token."""
    V, Vt = student_vocab_size(cfg), tokenizer.vocab_size
    if V != Vt:
        raise ConfigError(
            f"the student's vocabulary ({cfg.data.tokenizer} tokenizer, {V} tokens) differs from the teacher's "
            f"({teacher_cfg.data.tokenizer} tokenizer, {Vt} tokens): distillation compares their next-token "
            f"distributions, so the student must use the teacher's tokenizer (set data.tokenizer="
            f"{teacher_cfg.data.tokenizer}" + (f" data.bpe_vocab_size={Vt}" if teacher_cfg.data.tokenizer == "bpe" else "") + ")"
        )
    limit = min(cfg.model.max_seq_len, teacher_cfg.model.max_seq_len)
    if cfg.train.seq_len > limit:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} exceeds the context of the student or the teacher "
                          f"(max_seq_len {cfg.model.max_seq_len} and {teacher_cfg.model.max_seq_len})")


def distill_lm(teacher: str | Path | None, cfg: RunConfig | None, out_dir: str | Path, kd: DistillConfig | None = None,
               resume: bool = False, progress: bool = True, resume_overrides=()) -> dict:
    """Distill (or resume distilling) a student into `out_dir`; returns a summary like `train_lm`'s.

    resume=True takes the student config, the teacher and the KD settings saved
    in the run's last checkpoint (changed only by `resume_overrides`, e.g. train.steps=N).
    """
    out = Path(out_dir)
    if resume:
        cfg, kd = _resumed(out, resume_overrides)
    else:
        if cfg is None or teacher is None:
            raise ConfigError("distill_lm needs a teacher and a student RunConfig (or resume=True)")
        if out.exists() and any(out.glob("step-*")):
            raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        kd = kd or DistillConfig()
    teacher_model, tokenizer, teacher_cfg, teacher_dir = load_teacher(kd.teacher if resume else teacher)
    kd = replace(kd, teacher=str(Path(teacher_dir).resolve()))
    check_student(cfg, teacher_cfg, tokenizer)
    tc = cfg.train
    data = prepare_data(cfg.data, tc.seq_len, tokenizer)
    check_corpus_size(data, tc.seq_len)  # before the run directory exists
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=tokenizer.vocab_size))
    torch.manual_seed(tc.seed)
    student = build_model(cfg.model)
    teacher_model.to(resolve_device(tc.device))
    until = kd_steps(kd.kd_stop, tc.steps)

    def batch_fn(i):  # the optimizer step travels with the batch: KD stops at a step, not at a micro-batch
        x, y = batch_at(data.train, i, tc.batch_size, tc.seq_len, tc.seed)
        return x, y, i // tc.grad_accum

    def loss_fn(m, batch):
        x, y, step = batch
        out = m(x)
        loss, parts = lm_loss(out, y, tc.balance_loss_weight, tc.z_loss_weight)
        metrics = {k: float(v.detach()) for k, v in parts.items()}
        on = step < until and kd.kd_weight > 0
        if on:
            with torch.no_grad():
                teacher_logits = teacher_model(x).logits
            kd_part = kd_loss(out.logits, teacher_logits, kd.kd_temperature)
            loss = loss + kd.kd_weight * kd_part
            metrics["kd"] = float(kd_part.detach())
        metrics["kd_on"] = float(on)
        return loss, metrics

    def eval_fn(m, step):
        return {"val_loss": evaluate(m, data.val, tc, cfg.model)["val_loss"]}

    started = time.perf_counter()
    result = fit(student, tc, batch_fn=batch_fn, loss_fn=loss_fn, eval_fn=eval_fn, run_dir=out,
                 config_dict={**to_dict(cfg), "distill": to_dict(kd)}, tokenizer=tokenizer, resume=resume,
                 progress=progress, tokens_per_batch=tc.batch_size * tc.seq_len)
    return {"model": student, "tokenizer": tokenizer, "result": result, "config": cfg, "distill": kd,
            "kd_steps": until, "seconds": time.perf_counter() - started, "source": data.source}


def _resumed(out: Path, overrides) -> tuple[RunConfig, DistillConfig]:
    cfg = resume_run_config(out, overrides)
    saved = load_checkpoint(resolve_checkpoint(out), optimizer=False).config
    if not isinstance(saved.get("distill"), dict):
        raise ConfigError(f"the run in {out} is a training run, not a distillation: resume it with moekit train --resume")
    return cfg, from_dict(DistillConfig, saved["distill"], f"{out}: distill")
