"""`sparse-opd`: discover masks, analyze weight deltas and train sparse on-policy distillation from the command line.

Run `sparse-opd <command> --help` for the arguments of each command, with their defaults. Global options (such as
`--traceback`) come before the command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import CliError, HelpFormatter, one_line

# One module per command, each with `register(subparsers)` adding its parser with `set_defaults(func=...)`.
COMMANDS = ("train", "analyze", "compare", "overlap", "mask")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-opd", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command", title="commands")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `train` passes everything after its name to the job's own parser (TRL's, with --config files)
    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passes_rest", False):
        args.rest = rest
    elif rest:
        parser.parse_args(argv)  # argparse's own error, from the subcommand's parser
    try:
        return int(args.func(args) or 0)
    except (CliError, ValueError, OSError, ImportError) as err:
        if args.traceback:
            raise
        command = " ".join(filter(None, ("sparse-opd", args.command, getattr(args, "mask_command", None))))
        print(f"{command}: error: {one_line(err)}", file=sys.stderr)
        return 2


__all__ = ["CliError", "build_parser", "main"]
