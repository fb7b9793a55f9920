"""`sparse-opd mask diff|prior|stats|overlap|combine`."""

from __future__ import annotations

import json


def _diff(args):
    from .sparse_mask import SparseMask

    mask, report = SparseMask.from_diff(
        args.base, args.tuned, threshold=args.threshold, mode=args.mode, precision=args.precision,
        target_modules=args.target_modules, return_report=True, progress=True,
    )
    mask.save(args.out)
    print(f"{mask} -> {args.out}")
    print(f"kept {report.total_fraction:.4%} of the compared entries; {len(report.empty)} module(s) unchanged")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report.to_dict(), f, indent=1)


def _prior(args):
    from transformers import AutoModelForCausalLM

    from .priors import near_zero_mask, random_mask

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    if args.kind == "near_zero":
        mask = near_zero_mask(model, density=args.density, block_weights=args.block_weights)
    else:
        mask = random_mask(model, density=args.density, block_weights=args.block_weights, seed=args.seed)
    mask.save(args.out)
    print(f"{mask} -> {args.out}")


def _stats(args):
    from .sparse_mask import SparseMask

    mask = SparseMask.load(args.mask)
    print(mask)
    print(f"| {args.by} | coordinates | entries | density | share |\n|---|---:|---:|---:|---:|")
    for group, row in mask.density_by(args.by).items():
        print(f"| {group} | {row['count']:,} | {row['numel']:,} | {row['density']:.4%} | {row['share']:.2%} |")


def _overlap(args):
    from .sparse_mask import SparseMask

    result = SparseMask.load(args.a).overlap(SparseMask.load(args.b))
    total = result["total"].to_dict()
    if args.json:
        print(json.dumps({"total": total, "modules": {k: v.to_dict() for k, v in result["modules"].items()}}, indent=1))
        return
    print("| statistic | observed | random expectation | lift |\n|---|---:|---:|---:|")
    for key in ("jaccard", "coverage_a", "coverage_b"):
        print(f"| {key} | {total[key]:.4f} | {total['expected_' + key]:.4f} | {total[key + '_lift']:.2f}x |")
    print(f"| overlap coefficient | {total['overlap_coefficient']:.4f} | | |")
    print(f"| intersection | {total['intersection']:,} | {total['expected_intersection']:,.0f} | |")


def _combine(args):
    from .sparse_mask import SparseMask

    a, b = SparseMask.load(args.a), SparseMask.load(args.b)
    mask = a.union(b) if args.op == "union" else a.intersection(b)
    mask.save(args.out)
    print(f"{mask} -> {args.out}")


def register(subparsers) -> None:
    mask = subparsers.add_parser("mask", help="build, inspect and compare masks")
    sub = mask.add_subparsers(dest="mask_command", required=True)

    p = sub.add_parser("diff", help="coordinates changed between two checkpoints (streamed)")
    p.add_argument("base", help="base checkpoint: safetensors file, directory (sharded or not) or Hub id")
    p.add_argument("tuned", help="tuned checkpoint, same forms")
    p.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    p.add_argument("--threshold", type=float, default=1e-5)
    p.add_argument("--mode", choices=("abs", "rel", "changed"), default="abs")
    p.add_argument("--precision", choices=("raw", "bf16"), default="raw")
    p.add_argument("--target-modules", nargs="+", default=None)
    p.add_argument("--report", help="also write the per-module kept fractions as JSON here")
    p.set_defaults(func=_diff)

    p = sub.add_parser("prior", help="near-zero (smallest |W|) or random mask under a budget")
    p.add_argument("model", help="model directory or Hub id")
    p.add_argument("--kind", choices=("near_zero", "random"), default="near_zero")
    p.add_argument("--density", type=float, required=True)
    p.add_argument("--block-weights", default="ffn", help="'ffn' (FFN-heavy), 'uniform'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_prior)

    p = sub.add_parser("stats", help="density by module, type, block or layer")
    p.add_argument("mask")
    p.add_argument("--by", choices=("module", "type", "block", "layer"), default="block")
    p.set_defaults(func=_stats)

    p = sub.add_parser("overlap", help="Jaccard, coverages and overlap coefficient against random expectations")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_overlap)

    p = sub.add_parser("combine", help="union or intersection of two masks")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--op", choices=("union", "intersection"), default="union")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_combine)
