"""`moekit pregate`: flags, the call into moekit.train.pregate, printing.

Trains Pre-gated MoE heads (and optionally a pre-gated model) for expert
prefetching. Heavy imports happen inside the handler. Not here: the training
itself (moekit.train.pregate), the prefetchers that use the heads
(moekit.infer.prefetch), the parser itself (main.py).
"""

from __future__ import annotations


def _pregate(args) -> int:
    from ..train.pregate import finetune_pregated, format_report, train_pregate
    from .paths import out_dir

    out_dir(args.out)
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


def add_parsers(sub) -> None:
    """Register pregate on the `moekit` subparsers."""
    p = sub.add_parser("pregate", help="train Pre-gated MoE heads (and optionally a pre-gated model) for expert prefetching")
    p.add_argument("checkpoint", help="a moekit run directory or one of its step-* checkpoints")
    p.add_argument("--out", required=True, help="directory for the heads (pregate.safetensors, pregate.json)")
    p.add_argument("--steps", type=int, default=200, help="distillation steps on the training corpus (default 200)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step, for the heads and --finetune-steps (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate of the heads (default 3e-3)")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches for recall and loss (default 8)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="also fine-tune the pre-gated model (block i+1 routed at block i) for this many steps; 0 = skip")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="learning rate for --finetune-steps (default 1e-3)")
    p.add_argument("--finetune-control", action="store_true",
                   help="also fine-tune the original model the same way (not saved), to separate pre-gating from more training")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_pregate)


__all__ = ["add_parsers"]
