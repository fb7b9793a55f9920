"""`sparse-opd analyze`, `sparse-opd compare` and `sparse-opd overlap`."""

from __future__ import annotations

import argparse
import json
import os
import warnings


def _check_device(device: str) -> str:
    import torch

    from ..cli import CliError

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device}: no CUDA GPU is available here; use --device cpu (or auto)")
    return device


def _analyze(args):
    from .report import analyze_delta

    report = analyze_delta(args.base, args.tuned, rank_fraction=args.rank_fraction,
                           device=_check_device(args.device), progress=not args.quiet)
    report.save(args.out, plots=args.plots)
    print(report.summary())
    if report.skipped:
        print(f"skipped {len(report.skipped)} tensor(s); see report.md")
    print(f"wrote {args.out}/report.json, report.md" + (" and plots" if args.plots else ""))


def _compare(args):
    from .markdown import compare_markdown

    named = {}
    for path in args.reports:
        with open(path) as f:
            data = json.load(f)
        if "aggregates" not in data:
            raise ValueError(f"{path} is not a report.json written by `sparse-opd analyze`")
        named[os.path.basename(os.path.dirname(os.path.abspath(path))) or path] = data
    text = compare_markdown(named)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


def overlap_command(args):
    """Two mask files, or (with --base) two deltas of the same base: their shared coordinates against chance."""
    from ..masks.cli import write_json

    paths = list(args.paths)
    if len(paths) == 3:  # the old spelling `overlap BASE A B`
        warnings.warn("`sparse-opd overlap BASE A B` is now `sparse-opd overlap A B --base BASE`", FutureWarning,
                      stacklevel=1)
        args.base, paths = paths[0], paths[1:]
    if len(paths) != 2:
        raise ValueError(f"overlap compares two masks or deltas, got {len(paths)} paths")
    if args.base is None:
        return _mask_overlap(*paths, args.json)
    from .delta_overlap import delta_overlap, overlap_markdown

    result = delta_overlap(args.base, *paths, threshold=args.threshold, precision=args.precision, null=args.null)
    print(overlap_markdown(result, "A", "B"))
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} tensor(s): " + ", ".join(n for n, _ in result["skipped"][:10]))
    if args.json:
        write_json({"threshold": args.threshold, "precision": args.precision, "a": paths[0], "b": paths[1],
                    "total": result["total"].to_dict(),
                    "by_block": {k: v.to_dict() for k, v in result["by_block"].items()},
                    "modules": {k: v.to_dict() for k, v in result["modules"].items()},
                    "skipped": [{"name": n, "reason": r} for n, r in result["skipped"]]}, args.json)


def _mask_overlap(a: str, b: str, json_path: str | None):
    from ..masks import SparseMask
    from ..masks.cli import write_json

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
    from ..cli import add_parser, fraction, non_negative

    p = add_parser(subparsers, "analyze", "The geometry of a weight delta (checkpoint pair, or base + PEFT adapter).",
                   """Relative norm, sparsity as stored and through bf16, rank and spectral concentration, alignment with
the base weights' top singular subspaces, near-zero bias and module/layer breakdown, each beside a same-norm random
null. Writes report.json, report.md and plots to --out; streams one weight at a time.""")
    p.add_argument("base", help="base checkpoint: safetensors file, directory (sharded or not) or Hub id")
    p.add_argument("tuned", help="tuned checkpoint (same forms), or a PEFT adapter directory (sparse delta or LoRA)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--rank-fraction", type=fraction, default=0.05,
                   help="size of the source subspaces: r = max(1, int(fraction * min(m, n)))")
    p.add_argument("--device", default="auto", help="where SVDs run: 'auto' (a GPU if there is one), 'cpu', 'cuda'")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_analyze)

    p = add_parser(subparsers, "compare", "Headline numbers of several report.json files side by side (Markdown).")
    p.add_argument("reports", nargs="+", help="report.json files written by `sparse-opd analyze`")
    p.add_argument("--out", help="also write the Markdown table to this file")
    p.set_defaults(func=_compare)

    p = add_parser(subparsers, "overlap",
                   "Where two masks, or two deltas of the same base, select the same coordinates.",
                   """Jaccard index and coverages against their random expectation. Two mask files: `overlap A B`. Two
deltas (checkpoints or PEFT adapter directories): `overlap A B --base BASE`, with a null of two random deltas of the
same norms through the same precision (the chance level when visibility depends on W, as in bf16).""")
    p.add_argument("paths", nargs="+", metavar="A B", help="two mask files, or two tuned checkpoints / adapters")
    p.add_argument("--base", help="base checkpoint of two deltas (omit for two mask files)")
    p.add_argument("--threshold", type=non_negative, default=1e-5,
                   help="deltas: |delta| above which an entry counts as changed")
    p.add_argument("--precision", choices=("raw", "bf16"), default="raw",
                   help="deltas: 'raw' (as stored) or 'bf16' (what two bf16 checkpoints would show)")
    p.add_argument("--null", action=argparse.BooleanOptionalAction, default=True,
                   help="deltas: also measure two random deltas of the same norms (the chance level)")
    p.add_argument("--json", metavar="PATH", nargs="?", const="-",
                   help="also write the per-module result as JSON to PATH ('-' or no PATH: stdout)")
    p.set_defaults(func=overlap_command)
