"""The `moekit moefy` subcommand: a dense model (moekit, Hugging Face decoder or BERT encoder) into an MoE.

Glue only: parse the flags, check the request before reading anything, load
the source with `moekit.moefy.load`, read calibration files
(`moekit.moefy.calib`), convert, optionally train the decoupled router
(`moekit.moefy.tune`), and save. Every user mistake is a MoekitError raised
before anything is written. Heavy imports happen inside the handler.
"""

from __future__ import annotations


def _moefy(args) -> int:
    from pathlib import Path

    from ..moefy import MoefySpec, MoefyError, convert, load, save
    from ..moefy.calib import groups_for, read_groups
    from ..moefy.io import source_kind

    spec = MoefySpec(args.method, args.experts, args.top_k, args.shared_fraction, args.router, args.seed).check()
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoefyError(f"output {out} already exists and is not empty: choose a new directory")
    kind, _ = source_kind(args.src)
    if kind == "moefy":
        raise MoefyError(f"{args.src} is already a moefy output; convert the dense original")
    texts = read_groups(args.calib)
    if spec.method == "readme" and not texts:
        raise MoefyError("the readme method needs calibration data (--calib PATH ..., one group per file or domain); none was given")
    model = load(args.src)
    source = _tokenizer_dir(args.src, kind)
    calib = groups_for(model, texts, source)
    moe = convert(model, spec.method, spec.experts, spec.top_k, spec.shared_fraction, calib, spec.router, spec.seed)
    if spec.router == "decoupled":
        from ..moefy.tune import decoupled_from_calib

        moe = decoupled_from_calib(model, moe, calib, rounds=args.rounds, steps=args.router_steps)
    save(moe, out, source=source)
    print(f"moefy {spec.method}: {spec.experts} experts, top-{spec.top_k}, router {spec.router} -> {out}")
    return 0


def _tokenizer_dir(src, kind):
    from pathlib import Path

    if kind != "moekit":
        return Path(src)
    from ..checkpoints import resolve_checkpoint

    return resolve_checkpoint(src)


def add_parsers(sub) -> None:
    """Register moefy on the `moekit` subparsers."""
    p = sub.add_parser("moefy", help="convert a dense model into an MoE (upcycle, cluster = MoEfication, readme = Read-ME)")
    p.add_argument("src", help="a moekit checkpoint, or a Hugging Face llama / mistral / qwen2 / bert directory")
    p.add_argument("--method", required=True, choices=("upcycle", "cluster", "readme"),
                   help="upcycle (every expert a copy of the dense FFN), cluster (MoEfication: experts are slices of the "
                        "dense FFN's neurons) or readme (Read-ME: slices found on calibration text, needs --calib)")
    p.add_argument("--experts", type=int, required=True, help="number of experts E")
    p.add_argument("--top-k", type=int, required=True, help="experts per token (1 <= K <= E)")
    p.add_argument("--shared-fraction", type=float, default=0.0,
                   help="fraction of FFN neurons always on (cluster, readme); E must divide the rest")
    p.add_argument("--calib", nargs="+", metavar="PATH", help="calibration text: each file (or each file of a folder) is one group")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--router", default="per-layer", choices=("per-layer", "decoupled"),
                   help="per-layer routers, or one Read-ME router over token ids shared by all layers")
    p.add_argument("--rounds", type=int, default=2, help="decoupled router: distillation / expert-tuning rounds")
    p.add_argument("--router-steps", type=int, default=50, help="decoupled router: steps per phase")
    p.add_argument("--seed", type=int, default=0, help="seed of the clustering, the router fit and the random calibration text "
                   "used without --calib (default 0)")
    p.set_defaults(handler=_moefy)


__all__ = ["add_parsers"]
