"""`sparse-opd overlap A B [--base BASE]`: where two masks, or two deltas of one base, select the same coordinates."""

from __future__ import annotations

import argparse

from .common import add_parser, check_input, check_output_file, non_negative, write_json


def run(args):
    if args.json:
        check_output_file(args.json, "--json")
    if args.base is None:
        for path in (args.a, args.b):
            check_input(path, "mask file")
        return _masks(args.a, args.b, args.json)
    check_input(args.base, "base checkpoint", directory=True, hub=True)
    for path in (args.a, args.b):
        check_input(path, "tuned checkpoint or adapter", directory=True, hub=True)
    from ..analysis.delta_overlap import delta_overlap, overlap_markdown

    result = delta_overlap(args.base, args.a, args.b, threshold=args.threshold, precision=args.precision,
                           null=args.null)
    print(overlap_markdown(result, "A", "B"))
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} tensor(s): " + ", ".join(n for n, _ in result["skipped"][:10]))
    if args.json:
        write_json({"threshold": args.threshold, "precision": args.precision, "a": args.a, "b": args.b,
                    "total": result["total"].to_dict(),
                    "by_block": {k: v.to_dict() for k, v in result["by_block"].items()},
                    "modules": {k: v.to_dict() for k, v in result["modules"].items()},
                    "skipped": [{"name": n, "reason": r} for n, r in result["skipped"]]}, args.json)


def _masks(a: str, b: str, json_path: str | None):
    from ..masks import SparseMask

    result = SparseMask.load(a).overlap(SparseMask.load(b))
    total = result["total"].to_dict()
    if json_path:
        write_json({"total": total, "modules": {k: v.to_dict() for k, v in result["modules"].items()}}, json_path)
        if json_path == "-":
            return
    print("| statistic | observed | random expectation | lift |\n|---|---:|---:|---:|")
    for key in ("jaccard", "coverage_a", "coverage_b"):
        print(f"| {key} | {total[key]:.4f} | {total['expected_' + key]:.4f} | {total[key + '_lift']:.2f}x |")
    print(f"| overlap coefficient | {total['overlap_coefficient']:.4f} | | |")
    print(f"| intersection | {total['intersection']:,} | {total['expected_intersection']:,.0f} | |")


def register(subparsers) -> None:
    p = add_parser(subparsers, "overlap",
                   "Where two masks, or two deltas of the same base, select the same coordinates.",
                   """Jaccard index and coverages against their random expectation. Two mask files: `overlap A B`. Two
deltas (checkpoints or PEFT adapter directories): `overlap A B --base BASE`, with a null of two random deltas of the
same norms through the same precision (the chance level when visibility depends on W, as in bf16).""")
    p.add_argument("a", metavar="A", help="a mask file, or (with --base) a tuned checkpoint / adapter directory")
    p.add_argument("b", metavar="B", help="the other, of the same kind")
    p.add_argument("--base", help="base checkpoint of two deltas (omit for two mask files)")
    p.add_argument("--threshold", type=non_negative, default=1e-5,
                   help="deltas: |delta| above which an entry counts as changed")
    p.add_argument("--precision", choices=("raw", "bf16"), default="raw",
                   help="deltas: 'raw' (as stored) or 'bf16' (what two bf16 checkpoints would show)")
    p.add_argument("--null", action=argparse.BooleanOptionalAction, default=True,
                   help="deltas: also measure two random deltas of the same norms (the chance level)")
    p.add_argument("--json", metavar="PATH", nargs="?", const="-",
                   help="also write the per-module result as JSON to PATH ('-' or no PATH: stdout)")
    p.set_defaults(func=run)
