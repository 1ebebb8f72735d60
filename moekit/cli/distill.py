"""`moekit distill`: Mixture-of-Students, a student LM distilled from a trained teacher; flags, one library call, printing.

The handler calls `moekit.train.distill.distill_lm`; the student config is
resolved as `moekit train` resolves one (a preset name or a JSON file, then
key=value overrides, then --data). Heavy imports happen inside the handler.
Not here: the KD loss, the schedule, resuming rules (moekit.train.distill).
"""

from __future__ import annotations


def _distill(args) -> int:
    from ..errors import ConfigError
    from ..train.distill import DistillConfig, distill_lm
    from .paths import out_dir

    out_dir(args.out)
    args.teacher, args.overrides = _split_positionals(args.positionals)
    flags = {"kd_weight": args.kd_weight, "kd_temperature": args.kd_temperature, "kd_stop": args.kd_stop}
    kd = DistillConfig(**{k: v for k, v in flags.items() if v is not None})
    if args.resume:
        given = [f for f, v in (("TEACHER", args.teacher), ("--student", args.student), ("--data", args.data),
                                *((f"--{k.replace('_', '-')}", v) for k, v in flags.items())) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} cannot be combined with --resume: a resumed distillation keeps its "
                              f"teacher, student, data and KD settings (only some key=value overrides are accepted, e.g. train.steps=N)")
        summary = distill_lm(None, None, args.out, resume=True, progress=not args.quiet, resume_overrides=args.overrides)
    else:
        if not args.teacher or not args.student:
            raise ConfigError("moekit distill needs TEACHER (a trained run or checkpoint) and --student (a preset or a "
                              "JSON config), or --resume with the --out of an earlier distillation")
        summary = distill_lm(args.teacher, _student_config(args), args.out, kd, progress=not args.quiet)
    result = summary["result"]
    if result.interrupted:
        print(f"interrupted at step {result.step}; saved {result.checkpoint} (continue with --resume)")
        return 130
    from .train import steps_done, steps_in_all

    print(f"\ndistilled {steps_done(result)} in {summary['seconds'] / 60:.1f} min on {summary['source']} "
          f"(KD for the first {summary['kd_steps']} steps, teacher {summary['distill'].teacher}){steps_in_all(result)}")
    if result.last_eval:
        print(f"validation loss {result.last_eval['val_loss']:.4f}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _split_positionals(items: list[str]) -> tuple[str | None, list[str]]:
    """(TEACHER, overrides): the teacher is the first item that is not key=value (an existing path always is one)."""
    from pathlib import Path

    from ..errors import ConfigError

    paths = [i for i, item in enumerate(items) if "=" not in item or Path(item).exists()]
    if len(paths) > 1:
        raise ConfigError(f"moekit distill takes one TEACHER, got {items[paths[0]]!r} and {items[paths[1]]!r} "
                          f"(student settings are key=value overrides)")
    teacher = items[paths[0]] if paths else None
    return teacher, [item for i, item in enumerate(items) if i not in paths]


def _student_config(args):
    from pathlib import Path

    from ..train.lm import resolve_run_config

    spec = args.student
    is_file = spec.endswith(".json") or Path(spec).is_file()
    return resolve_run_config(None if is_file else spec, spec if is_file else None, args.overrides, args.data)


def add_parsers(sub) -> None:
    """Register distill on the `moekit` subparsers."""
    p = sub.add_parser("distill", help="distill a smaller student LM from a trained teacher (Mixture-of-Students)")
    p.add_argument("positionals", nargs="*", metavar="TEACHER [key=value ...]",
                   help="the teacher (a trained run or checkpoint directory), then student config overrides, e.g. "
                        "model.num_layers=3 model.pyramid=[4,8] train.steps=500 (with --resume: train.steps=N etc. only); "
                        "TEACHER and the overrides go together, before or after the flags")
    p.add_argument("--student", help="the student: a preset (tiny, small, pr-moe, ...) or a JSON config file")
    p.add_argument("--out", required=True, help="run directory for the student's checkpoints and metrics")
    p.add_argument("--data", help="a text file or folder (default: the student config's corpus)")
    p.add_argument("--kd-weight", type=float, help="weight of the KD term (default 1.0)")
    p.add_argument("--kd-temperature", type=float, help="softmax temperature T of the KD term (default 1.0)")
    p.add_argument("--kd-stop", type=float,
                   help="fraction of the steps with KD, in [0, 1]; the rest train on the LM loss alone (default 0.5)")
    p.add_argument("--resume", action="store_true", help="continue the distillation in --out exactly where it stopped")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_distill)


__all__ = ["add_parsers"]
