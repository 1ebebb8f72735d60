"""`moekit train` and `moekit inspect`: flags, one library call each, printing.

The handlers call `moekit.train.lm` (train_lm, inspect_checkpoint), give them
the engine's greedy answers (`moekit.infer.answers`, a math_tasks run's exact
match) and, for the sample printed after training where the run's recipe
(`moekit.train.recipes`) asks for one, the generation engine (`moekit.infer.Engine`). Heavy imports happen inside the
handlers. Not here: training, resuming rules (moekit.train.lm), the parser
itself (main.py).
"""

from __future__ import annotations


def _train(args) -> int:
    from ..infer.answers import greedy_answers
    from ..train.lm import inspect_checkpoint, resolve_run_config, train_lm
    from ..train.recipes import recipe_for
    from .paths import out_dir

    out_dir(args.out)
    if args.resume:
        _check_resume_flags(args)
        cfg = None
    else:
        cfg = resolve_run_config(args.preset, args.config, args.overrides, args.data)
    summary = train_lm(cfg, args.out, resume=args.resume, progress=not args.quiet, expert_parallel=args.expert_parallel,
                       resume_overrides=args.overrides if args.resume else (), answers=greedy_answers)
    result = summary["result"]
    if not summary["is_main"]:  # under torchrun only rank 0 reports, samples and inspects
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted at step {result.step}; saved {result.checkpoint} (continue with --resume)")
        return 130
    minutes = summary["seconds"] / 60
    print(f"\ntrained {steps_done(result)} in {minutes:.1f} min on {summary['source']}{steps_in_all(result)}")
    if result.last_eval:
        print(f"validation loss {result.last_eval['val_loss']:.4f}")
    print(f"checkpoint: {result.checkpoint}")
    if not args.no_sample and recipe_for(summary["config"].data.kind).sample:  # (a math_tasks run: exact match)
        from ..infer import Engine

        text = Engine(summary["model"], summary["tokenizer"]).generate([args.sample_prompt], **SAMPLE)[0].text
        print(f"\n--- sample (prompt {args.sample_prompt!r}; {SAMPLE_TEXT}) ---\n{args.sample_prompt}{text}\n---")
    report = inspect_checkpoint(result.checkpoint, heatmap=f"{args.out}/expert_load.png", answers=greedy_answers)
    print(f"\nrouting on validation text:\n{report['summary']}")
    if report["heatmap"]:  # (a dense model has no expert load)
        print(f"expert-load heatmap: {report['heatmap']}")
    _print_tasks(report)
    return 0


# the sample after training: greedy decoding of a small model loops on its likeliest phrase, so it is sampled
SAMPLE = {"temperature": 0.7, "top_p": 0.95, "repetition_penalty": 1.1, "seed": 0}
SAMPLE_TEXT = "temperature 0.7, top-p 0.95, repetition penalty 1.1, seed 0"


def steps_done(result) -> str:
    """The steps this invocation ran ("trained N steps"): a resumed run counts from where it resumed."""
    n = result.step - result.start_step
    return f"{n} step{'' if n == 1 else 's'}"


def steps_in_all(result) -> str:
    """For a resumed run, where it resumed and the steps it has in all; else nothing."""
    return f" (resumed at step {result.start_step}; the run has trained {result.step} steps in all)" if result.start_step else ""


def _print_tasks(report: dict) -> None:
    """The task parts of an inspect report (a data.kind=math_tasks model): exact match, entropy, heatmap."""
    if "exact_match" in report:
        em = report["exact_match"]
        print("exact match (greedy, test problems): " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in em.items()))
    if report.get("task_summary"):
        print(report["task_summary"])
    if report.get("task_heatmap"):
        print(f"task x expert heatmap: {report['task_heatmap']}")


def _check_resume_flags(args) -> None:
    """--resume continues the run's saved config: a new preset, config file or corpus would silently not apply."""
    from ..errors import ConfigError

    given = [flag for flag, value in (("--preset", args.preset), ("--config", args.config), ("--data", args.data)) if value]
    if given:
        raise ConfigError(f"{', '.join(given)} cannot be combined with --resume: a resumed run keeps the preset, config "
                          f"and data it was started with (only some key=value overrides are accepted, e.g. train.steps=N)")


def _inspect(args) -> int:
    from ..infer.answers import greedy_answers
    from ..train.lm import inspect_checkpoint
    from .paths import out_file, positive

    positive(args.batches, "--batches")
    if args.heatmap:
        out_file(args.heatmap, "--heatmap", example="expert_load.png")
    report = inspect_checkpoint(args.checkpoint, heatmap=args.heatmap, batches=args.batches, answers=greedy_answers)
    p = report["params"]
    print(f"checkpoint: {report['checkpoint']}")
    print(f"parameters: {p['total']:,} total, {p['active']:,} active per token")
    print(parameter_table(report["param_rows"]))
    n, trained = report["batches"], report["train_eval_batches"]
    print(f"validation loss: {report['val_loss']:.4f} ({n} batch{'es' * (n != 1)}; training evaluated {trained})")
    print(report["summary"])
    if report["heatmap"]:
        print(f"expert-load heatmap: {report['heatmap']}")
    _print_tasks(report)
    return 0


def parameter_table(rows: list[dict]) -> str:
    """Per-part parameters as an aligned text table: part, FFN, experts (top-k), total, active per token."""
    header = ["part", "ffn", "experts", "total", "active"]
    body = [[r["part"], r["ffn"], f"{r['experts']} (top-{r['top_k']})" if r["experts"] else "", f"{r['total']:,}",
             f"{r['active']:,}"] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    fmt = lambda line: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
    return "\n".join(fmt(line).rstrip() for line in [header, *body])


def add_parsers(sub) -> None:
    """Register train and inspect on the `moekit` subparsers."""
    p = sub.add_parser("train", help="train a MoE language model")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. moe.num_experts=16 train.steps=500 (with --resume: train.steps, "
                        "train.eval_every, train.eval_batches, train.save_every, train.keep_last only)")
    p.add_argument("--preset", help="tiny (under a minute), small (the default), pr-moe (small as a PR-MoE: Residual-MoE "
                                    "top-1, 8 experts then 16), pr-moe-350m (DeepSpeed-MoE's shape), moma-small "
                                    "(mixed-modal MoMa) or math_tasks (multi-task MoE on moekit's math suite)")
    p.add_argument("--config", help="a JSON config file (RunConfig: model, train, data)")
    p.add_argument("--data", help="a text file or folder (default: the Python standard library's source)")
    p.add_argument("--out", required=True, help="run directory for checkpoints, metrics and plots")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where it stopped (extend a finished one with train.steps=N)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--expert-parallel", type=int, default=0, metavar="N",
                   help="shard the experts over N ranks; start with torchrun --nproc-per-node M -m moekit train "
                        "(M a multiple of N; the batch is split over all M ranks)")
    p.add_argument("--no-sample", action="store_true", help="skip the sample printed after training")
    p.add_argument("--sample-prompt", default="def ", help="prompt for the sample printed after training")
    p.set_defaults(handler=_train)

    p = sub.add_parser("inspect", help="parameters and expert load of a checkpoint")
    p.add_argument("checkpoint", help="a run directory or one of its step-* checkpoints")
    p.add_argument("--heatmap", help="where to write the expert-load PNG (default: inside the checkpoint)")
    p.add_argument("--batches", type=int, default=4, help="validation batches to route (default 4)")
    p.set_defaults(handler=_inspect)


__all__ = ["add_parsers"]
