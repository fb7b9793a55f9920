"""`sparse-opd analyze BASE TUNED_OR_ADAPTER --out DIR`, `sparse-opd compare REPORT.json ... --out FILE.md` and
`sparse-opd overlap BASE A B`."""

from __future__ import annotations

import argparse
import json
import os


def _analyze(args):
    from .plots import write_plots
    from .report import analyze_delta

    report = analyze_delta(args.base, args.tuned, rank_fraction=args.rank_fraction, device=args.device)
    os.makedirs(args.out, exist_ok=True)
    report.to_json(os.path.join(args.out, "report.json"))
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report.to_markdown())
    write_plots(report.to_dict(), args.out)
    print(report.summary())
    if report.skipped:
        print(f"skipped {len(report.skipped)} tensor(s); see report.md")
    print(f"wrote {args.out}/report.json, report.md and plots")


def _compare(args):
    from .markdown import compare_markdown

    named = {}
    for path in args.reports:
        with open(path) as f:
            named[os.path.basename(os.path.dirname(os.path.abspath(path))) or path] = json.load(f)
    text = compare_markdown(named)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)


def _overlap(args):
    from .overlap import delta_overlap, overlap_markdown

    result = delta_overlap(args.base, args.a, args.b, threshold=args.threshold, precision=args.precision,
                           null=args.null)
    print(overlap_markdown(result, "A", "B"))
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} tensor(s): " + ", ".join(n for n, _ in result["skipped"][:10]))
    if args.json:
        out = {"threshold": args.threshold, "precision": args.precision, "a": args.a, "b": args.b,
               "total": result["total"].to_dict(),
               "by_block": {k: v.to_dict() for k, v in result["by_block"].items()},
               "modules": {k: v.to_dict() for k, v in result["modules"].items()},
               "skipped": [{"name": n, "reason": r} for n, r in result["skipped"]]}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def register(subparsers) -> None:
    p = subparsers.add_parser("analyze", help="geometry of a weight delta (checkpoint pair or base + PEFT adapter)")
    p.add_argument("base", help="base checkpoint (file, directory, Hub id)")
    p.add_argument("tuned", help="tuned checkpoint, or a PEFT adapter directory (sparse delta or LoRA)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--rank-fraction", type=float, default=0.05, help="r / min(m, n) of the alignment subspaces")
    p.add_argument("--device", default="auto", help="'auto' (GPU if there is one), 'cpu', 'cuda'")
    p.set_defaults(func=_analyze)
    p = subparsers.add_parser("compare", help="put several report.json side by side")
    p.add_argument("reports", nargs="+")
    p.add_argument("--out", help="also write the Markdown table here")
    p.set_defaults(func=_compare)
    p = subparsers.add_parser("overlap", help="where two deltas of the same base change the same coordinates")
    p.add_argument("base", help="base checkpoint (file, directory, Hub id)")
    p.add_argument("a", help="first tuned checkpoint or PEFT adapter directory")
    p.add_argument("b", help="second tuned checkpoint or PEFT adapter directory")
    p.add_argument("--threshold", type=float, default=1e-5, help="|delta| above which an entry counts as changed")
    p.add_argument("--precision", choices=("raw", "bf16"), default="raw",
                   help="'raw' (as stored) or 'bf16' (what two bf16 checkpoints would show)")
    p.add_argument("--null", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure two random deltas of the same norms through the same precision (the chance level)")
    p.add_argument("--json", help="also write the per-module result here")
    p.set_defaults(func=_overlap)
