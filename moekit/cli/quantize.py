"""`moekit quantize`: flags, one library call (moekit.infer.quantized_checkpoint), printing.

Writes a weight-only quantized moekit checkpoint (int8 per output channel, or
int4 group-wise, symmetric or with zero points) that `moekit generate`,
`moekit inspect` and `Engine.load` load. Heavy imports happen inside the
handler. Not here: the formats, the transform, the files (moekit.quantize,
moekit.infer.quantized_checkpoint), the parser itself (main.py).
"""

from __future__ import annotations


BITS = (8, 4)  # = moekit.moe.quant_format.BITS (not imported: torch)
GROUP_SIZES = (32, 64, 128)  # = moekit.moe.quant_format.GROUP_SIZES
SCOPES = ("experts", "all")  # = moekit.quantize.SCOPES


def _quantize(args) -> int:
    from ..errors import ConfigError
    from ..infer.quantized_checkpoint import quantize_checkpoint

    if args.bits == 8 and (args.group_size is not None or not args.symmetric):
        raise ConfigError("--group-size and --zero-point apply to --bits 4 only: int8 has one symmetric scale per output channel")
    group = args.group_size if args.bits == 4 and args.group_size is not None else (32 if args.bits == 4 else None)
    out = quantize_checkpoint(args.src, args.out, bits=args.bits, group_size=group, symmetric=args.symmetric, scope=args.scope)
    what = "int8 per output channel" if args.bits == 8 else f"int4, group {group}, {'symmetric' if args.symmetric else 'zero points'}"
    print(f"wrote a quantized checkpoint ({what}, scope {args.scope}) to {out}")
    return 0


def add_parsers(sub) -> None:
    """Register quantize on the `moekit` subparsers."""
    p = sub.add_parser("quantize", help="write a weight-only int8/int4 quantized checkpoint")
    p.add_argument("src", help="a moekit run/checkpoint directory or a Hugging Face model directory")
    p.add_argument("--bits", type=int, required=True, choices=BITS, help="8 (per output channel) or 4 (group-wise)")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, help="int4 group size along the input width (default 32)")
    p.add_argument("--scope", default="experts", choices=SCOPES,
                   help="experts (default): the MoE experts; all: also attention, dense MLPs and an untied head "
                        "(routers, norms and the embedding stay full precision)")
    zp = p.add_mutually_exclusive_group()
    zp.add_argument("--symmetric", dest="symmetric", action="store_true", default=True, help="int4 symmetric groups (default)")
    zp.add_argument("--zero-point", dest="symmetric", action="store_false", help="int4 groups with a zero point each")
    p.add_argument("--out", required=True, help="the new checkpoint directory (must not exist or be empty)")
    p.set_defaults(handler=_quantize)


__all__ = ["add_parsers"]
