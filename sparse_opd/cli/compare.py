"""`sparse-opd compare`: the headline numbers of several `sparse-opd analyze` reports side by side."""

from __future__ import annotations

import json
import os

from .common import add_parser, check_input, check_output_file, write_text


def run(args):
    for path in args.reports:
        check_input(path, "report")
    if args.out:
        check_output_file(args.out, "--out")
    from ..analysis.markdown import compare_markdown

    named = {}
    for path in args.reports:
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError):
                data = None
        if not isinstance(data, dict) or "aggregates" not in data:
            raise ValueError(f"{path} is not a report.json written by `sparse-opd analyze`")
        named[os.path.basename(os.path.dirname(os.path.abspath(path))) or path] = data
    text = compare_markdown(named)
    if args.out:
        write_text(text, args.out)
    print(text)


def register(subparsers) -> None:
    p = add_parser(subparsers, "compare", "Headline numbers of several report.json files side by side (Markdown).")
    p.add_argument("reports", nargs="+", help="report.json files written by `sparse-opd analyze`")
    p.add_argument("--out", help="also write the Markdown table to this file")
    p.set_defaults(func=run)
