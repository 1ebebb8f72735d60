"""The `moekit` command: the parser, subcommand registration and error handling.

Each command group lives in its own module (train.py: train, inspect;
generate.py: generate, convert; pregate.py: pregate; distill.py: distill; forecast.py:
train-forecaster, forecast, eval-forecast) and registers its subcommands with
an `add_parsers(sub)` hook. Those modules import nothing heavy at parse time
(torch, transformers, matplotlib and the moekit modules that import them load
inside the handlers), so `moekit --help` answers at once. A user's mistake
(any MoekitError) is printed as one line on stderr with exit status 2, without
a traceback.

Not here: any command's flags or behaviour.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("moekit.cli.train", "moekit.cli.generate", "moekit.cli.pregate", "moekit.cli.forecast",
                   "moekit.cli.quantize", "moekit.cli.serve", "moekit.cli.moefy", "moekit.cli.refine",
                   "moekit.cli.distill")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts models: train, inspect, generate, forecast.")
    parser.add_argument("--version", action="version", version=f"moekit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parsers(sub)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    from ..errors import MoekitError

    parser = build_parser()
    args = parse(parser, argv)
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


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, key=value overrides taken wherever they stand."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        _take_overrides(parser, args, extra)
    return args


def _take_overrides(parser: argparse.ArgumentParser, args, extra: list[str]) -> None:
    """key=value overrides anywhere on the line: argparse keeps only the first run of them in the positional.

    The rest come back as unrecognized and are appended, in order, to the command's overrides (or to
    distill's TEACHER key=value list); anything else is still refused as argparse refuses it.
    """
    dest = next((d for d in ("overrides", "positionals") if hasattr(args, d)), None)
    if dest is None or any(a.startswith("-") or "=" not in a for a in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setattr(args, dest, [*(getattr(args, dest) or []), *extra])


if __name__ == "__main__":
    sys.exit(main())
