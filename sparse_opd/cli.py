"""`sparse-opd`: discover masks, analyze weight deltas and train sparse on-policy distillation from the command line.

Run `sparse-opd <command> --help` for the arguments of each command, with their defaults.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes `register(subparsers)`, adding its subcommands with `set_defaults(func=...)`.
_SUBCOMMAND_MODULES = ("sparse_opd.masks.cli", "sparse_opd.analysis.cli", "sparse_opd.train_cli")


class CliError(Exception):
    """A problem with the command line or its inputs: reported as one line, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; every argument's help shows its default."""


def add_parser(subparsers, name: str, summary: str, description: str = "", **kwargs) -> argparse.ArgumentParser:
    """A subcommand listed with ``summary``; its `--help` shows ``summary``, ``description`` and every default."""
    text = summary + ("\n\n" + description.strip() if description else "")
    return subparsers.add_parser(name, help=summary.rstrip("."), description=text, formatter_class=HelpFormatter,
                                 **kwargs)


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def non_negative(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a finite number >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-opd", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command", title="commands")
    for module_name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is None or not module_name.startswith(err.name):
                raise  # a missing dependency inside the module, not a subpackage that is absent
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the job parses its own flags (TRL's parser, --config files)
        from .train_cli import main as train

        return train(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ImportError) as err:
        if args.traceback:
            raise
        command = " ".join(filter(None, ("sparse-opd", args.command, getattr(args, "mask_command", None))))
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
