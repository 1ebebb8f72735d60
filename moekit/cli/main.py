"""The `moekit` command: thin glue over library calls.

Each subcommand parses its flags, calls one library function and prints.
Heavy imports happen inside the handlers so `moekit --help` is instant. A
user's mistake (any MoekitError) is printed as one line on stderr with exit
status 2; there is no traceback for it.
"""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from ..train.lm import resolve_run_config, sample, train_lm

    cfg = resolve_run_config(args.preset, args.config, args.overrides, args.data)
    if args.resume and (args.preset or args.config or args.overrides or args.data):
        print("note: --resume continues with the run's saved config; preset/config/overrides are ignored", file=sys.stderr)
    summary = train_lm(cfg, args.out, resume=args.resume, progress=not args.quiet, expert_parallel=args.expert_parallel)
    result = summary["result"]
    if not summary["is_main"]:  # under torchrun only rank 0 reports, samples and inspects
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted at step {result.step}; saved {result.checkpoint} (continue with --resume)")
        return 130
    minutes = summary["seconds"] / 60
    print(f"\ntrained {result.step} steps in {minutes:.1f} min on {summary['source']}")
    if result.last_eval:
        print(f"validation loss {result.last_eval['val_loss']:.4f}")
    print(f"checkpoint: {result.checkpoint}")
    if not args.no_sample:
        text = sample(summary["model"].eval(), summary["tokenizer"], args.sample_prompt, max_new_tokens=200, temperature=0.8)
        print(f"\n--- sample (prompt {args.sample_prompt!r}) ---\n{args.sample_prompt}{text}\n---")
    from ..train.lm import inspect_checkpoint

    report = inspect_checkpoint(result.checkpoint, heatmap=f"{args.out}/expert_load.png")
    print(f"\nrouting on validation text:\n{report['summary']}")
    print(f"expert-load heatmap: {report['heatmap']}")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a MoE language model")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. moe.num_experts=16 train.steps=500")
    p.add_argument("--preset", help="tiny (under a minute) or small (the default)")
    p.add_argument("--config", help="a JSON config file (RunConfig: model, train, data)")
    p.add_argument("--data", help="a text file or folder (default: the Python standard library's source)")
    p.add_argument("--out", required=True, help="run directory for checkpoints, metrics and plots")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--expert-parallel", type=int, default=0, metavar="N",
                   help="shard the experts over N ranks; start with torchrun --nproc-per-node M -m moekit train "
                        "(M a multiple of N; the batch is split over all M ranks)")
    p.add_argument("--no-sample", action="store_true", help="skip the sample printed after training")
    p.add_argument("--sample-prompt", default="def ", help="prompt for the sample printed after training")
    p.set_defaults(handler=_train)


def _inspect(args) -> int:
    from ..train.lm import inspect_checkpoint

    report = inspect_checkpoint(args.checkpoint, heatmap=args.heatmap, batches=args.batches)
    p = report["params"]
    print(f"checkpoint: {report['checkpoint']}")
    print(f"parameters: {p['total']:,} total, {p['active']:,} active per token")
    print(f"validation loss: {report['val_loss']:.4f}")
    print(report["summary"])
    if report["heatmap"]:
        print(f"expert-load heatmap: {report['heatmap']}")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="parameters and expert load of a checkpoint")
    p.add_argument("checkpoint", help="a run directory or one of its step-* checkpoints")
    p.add_argument("--heatmap", help="where to write the expert-load PNG (default: inside the checkpoint)")
    p.add_argument("--batches", type=int, default=4, help="validation batches to route (default 4)")
    p.set_defaults(handler=_inspect)


def _generate(args) -> int:
    from ..infer.engine import Engine, check_settings

    settings = check_settings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop_strings=args.stop or [])
    engine = Engine.load(args.model, dtype=args.dtype, device=args.device)
    prompt = engine.encode(args.prompt, chat=args.chat, system=args.system)
    engine.check_prompts([prompt])
    if args.expert_budget is not None:
        _offload(engine, args, prompt, settings)
    elif args.prefetch or args.cache or args.pregate or args.slow_tier:
        from ..errors import ConfigError

        raise ConfigError("--prefetch, --cache, --pregate and --slow-tier need --expert-budget (e.g. --expert-budget 25%)")
    if not args.chat:
        print(args.prompt, end="", flush=True)

    def stream(index: int, token: int, text: str) -> None:
        print(text, end="", flush=True)

    engine.generate_ids([prompt], settings, on_token=stream)
    print()
    if args.stats:
        _print_stats(engine)
    return 0


def _offload(engine, args, prompt, settings) -> None:
    """Offload the engine's experts as the --expert-budget/--prefetch/--cache/... flags say."""
    tier = args.slow_tier or ("cuda-host" if engine.device.type == "cuda" else "disk")
    options = dict(tier=tier, predictor=args.prefetch or "none", pregate=args.pregate,
                   link_bandwidth=args.link_bandwidth, link_latency=args.link_latency)
    policy = args.cache or "lru"
    if policy != "belady":
        engine.offload(args.expert_budget, policy=policy, **options)
        return
    # Belady needs the future: a silent first pass (same prompt and seed, so the same tokens) records the routing.
    offloader = engine.offload(args.expert_budget, policy="lru", **options)
    engine.generate_ids([prompt], settings)
    offloader.configure(args.expert_budget, "belady", options["predictor"], trace=offloader.trace, pregate=args.pregate)


def _print_stats(engine) -> None:
    stats = engine.last_stats
    if stats.get("offload"):
        from ..infer.offload import format_stats

        print(format_stats(stats["offload"], stats))
    else:
        print(f"{stats['new_tokens']} new tokens; prefill {1000 * stats['prefill_s']:.1f} ms, "
              f"decode {stats['decode_tokens_per_s']:.2f} tokens/s")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a Hugging Face model directory or a moekit checkpoint")
    p.add_argument("model", help="a Hugging Face model directory (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) or a moekit run/checkpoint")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set with probability >= p (1 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop when this text appears (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the model's chat template")
    p.add_argument("--system", help="a system message for --chat")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or auto (config.json's)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    off = p.add_argument_group("expert offloading (run a model whose experts do not fit in fast memory)")
    off.add_argument("--expert-budget", metavar="SIZE",
                     help="fast memory for experts: bytes (300MB, 2GB) or a fraction of all experts (25%%); the rest stay in the slow tier")
    off.add_argument("--prefetch", metavar="PREDICTOR",
                     help="how the next layer's experts are predicted and fetched early: none (default), prefetch-all, next-gate, pregate")
    off.add_argument("--cache", metavar="POLICY", help="expert cache policy: lru (default), lfu, lfru, belady (offline optimum; runs the prompt twice)")
    off.add_argument("--pregate", metavar="DIR", help="pre-gate heads trained by `moekit pregate` (for --prefetch pregate)")
    off.add_argument("--slow-tier", metavar="TIER",
                     help="where the experts live: disk (default on CPU: the checkpoint's safetensors), emulated (a link of "
                          "--link-bandwidth/--link-latency), cuda-host (default on CUDA: pinned host memory)")
    off.add_argument("--link-bandwidth", metavar="RATE", help="emulated link bandwidth, e.g. 2GB/s")
    off.add_argument("--link-latency", metavar="TIME", default="0", help="emulated link latency per transfer, e.g. 50us (default 0)")
    p.add_argument("--stats", action="store_true", help="print decode speed and (when offloading) cache and transfer statistics")
    p.set_defaults(handler=_generate)


def _pregate(args) -> int:
    from ..train.pregate import finetune_pregated, format_report, train_pregate

    report = train_pregate(args.checkpoint, args.out, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                           lr=args.lr, eval_batches=args.eval_batches, progress=not args.quiet)
    if args.finetune_steps > 0:
        report["pregated_model"] = finetune_pregated(args.checkpoint, args.out, steps=args.finetune_steps, lr=args.finetune_lr,
                                                     batch_size=args.batch_size, seq_len=args.seq_len,
                                                     eval_batches=args.eval_batches, control=args.finetune_control,
                                                     progress=not args.quiet)
    print(f"top-{report['top_k'][0]} recall of the next MoE layer's experts on validation text:")
    print(format_report(report))
    print(f"pre-gate heads: {args.out} (use: moekit generate ... --expert-budget 25% --prefetch pregate --pregate {args.out})")
    return 0


def _add_pregate(sub) -> None:
    p = sub.add_parser("pregate", help="train Pre-gated MoE heads (and optionally a pre-gated model) for expert prefetching")
    p.add_argument("checkpoint", help="a moekit run directory or one of its step-* checkpoints")
    p.add_argument("--out", required=True, help="directory for the heads (pregate.safetensors, pregate.json)")
    p.add_argument("--steps", type=int, default=200, help="distillation steps on the training corpus (default 200)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches for recall and loss (default 8)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="also fine-tune the pre-gated model (block i+1 routed at block i) for this many steps; 0 = skip")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--finetune-control", action="store_true",
                   help="also fine-tune the original model the same way (not saved), to separate pre-gating from more training")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_pregate)


HF_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")  # = moekit.hf.SUPPORTED_MODEL_TYPES (not imported: torch)


def _convert(args) -> int:
    from ..hf import convert

    out = convert(args.checkpoint, args.out_dir, arch=args.arch)
    print(f"wrote a Hugging Face model to {out}")
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write a moekit checkpoint as a Hugging Face model directory")
    p.add_argument("checkpoint", help="a moekit run directory or one of its step-* checkpoints")
    p.add_argument("out_dir", help="the new Hugging Face model directory (must not exist or be empty)")
    p.add_argument("--to", required=True, choices=["hf"], help="the target format: hf (Hugging Face transformers)")
    p.add_argument("--arch", default="auto", choices=["auto", *HF_ARCHS],
                   help="the Hugging Face family to write (default: the first one the model fits)")
    p.set_defaults(handler=_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts models: train, inspect, generate, forecast.")
    parser.add_argument("--version", action="version", version=f"moekit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_generate(sub)
    _add_convert(sub)
    _add_inspect(sub)
    _add_pregate(sub)
    _add_optional(sub, "moekit.cli.forecast")
    return parser


def _add_optional(sub, module: str) -> None:
    """Subcommands that live beside their library code register themselves."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        return
    mod.add_parsers(sub)


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    from ..errors import MoekitError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 0
    try:
        return args.handler(args)
    except MoekitError as e:
        print(f"moekit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moekit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
