"""What every command shares: the error type, the help format, argument types, and writing outputs."""

from __future__ import annotations

import argparse
import json

from ..job.console import HelpFormatter, one_line
from ..paths import check_input, check_output_dir, check_output_file

__all__ = ["CliError", "HelpFormatter", "add_parser", "check_input", "check_output_dir", "check_output_file",
           "fraction", "non_negative", "one_line", "write_json", "write_text"]


class CliError(Exception):
    """A problem with the command line or its inputs: reported as one line, exit status 2."""


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


def write_text(text: str, path: str) -> None:
    """Write ``text`` to ``path`` (``-``: standard output); ``path`` was checked with `check_output_file`."""
    if path == "-":
        print(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")


def write_json(data, path: str) -> None:
    """Write ``data`` as JSON to ``path`` (``-``: standard output)."""
    write_text(json.dumps(data, indent=1), path)
