"""`sparse-opd mask diff | prior | stats | combine`: build, inspect and combine masks."""

from __future__ import annotations

from .common import add_parser, check_input, check_output_file, fraction, non_negative, write_json

CHECKPOINT = "a safetensors file, a directory (sharded or not) or a Hub id"


def diff(args):
    check_input(args.base, "base checkpoint", directory=True, hub=True)
    check_input(args.tuned, "tuned checkpoint", directory=True, hub=True)
    check_output_file(args.out, "--out")
    if args.json:
        check_output_file(args.json, "--json")
    from ..masks import SparseMask

    mask, report = SparseMask.from_diff(
        args.base, args.tuned, threshold=args.threshold, mode=args.mode, precision=args.precision,
        target_modules=args.target_modules, return_report=True, progress=True,
    )
    mask.save(args.out)
    print(f"{mask} -> {args.out}")
    print(f"kept {report.total_fraction:.4%} of the compared entries; {len(report.empty)} module(s) unchanged")
    if args.json:
        write_json(report.to_dict(), args.json)


def prior(args):
    if args.model != "embedded":
        check_input(args.model, "model", file=False, directory=True, hub=True)
    check_output_file(args.out, "--out")
    from transformers import AutoModelForCausalLM

    from ..embedded import resolve_model_path
    from ..masks import near_zero_mask, random_mask

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype="auto")
    if args.kind == "near_zero":
        mask = near_zero_mask(model, density=args.density, block_weights=args.block_weights,
                              target_modules=args.target_modules)
    else:
        mask = random_mask(model, density=args.density, block_weights=args.block_weights,
                           target_modules=args.target_modules, seed=args.seed)
    mask.save(args.out)
    print(f"{mask} -> {args.out}")


def stats(args):
    check_input(args.mask, "mask file")
    if args.json:
        check_output_file(args.json, "--json")
    from ..masks import SparseMask

    mask = SparseMask.load(args.mask)
    groups = mask.density_by(args.by)
    if args.json:
        write_json({"modules": len(mask), "coordinates": mask.count(), "density": mask.density(), args.by: groups},
                   args.json)
        if args.json == "-":
            return
    print(mask)
    print(f"| {args.by} | coordinates | entries | density | share |\n|---|---:|---:|---:|---:|")
    for group, row in groups.items():
        print(f"| {group} | {row['count']:,} | {row['numel']:,} | {row['density']:.4%} | {row['share']:.2%} |")


def combine(args):
    check_input(args.a, "mask file")
    check_input(args.b, "mask file")
    check_output_file(args.out, "--out")
    from ..masks import SparseMask

    a, b = SparseMask.load(args.a), SparseMask.load(args.b)
    mask = a.union(b) if args.op == "union" else a.intersection(b)
    mask.save(args.out)
    print(f"{mask} -> {args.out}")


def register(subparsers) -> None:
    mask = add_parser(subparsers, "mask",
                      "Build, inspect and combine masks (which coordinates a sparse delta trains).",
                      "Subcommands: diff (from two checkpoints), prior (near-zero or random), stats, combine. "
                      "`sparse-opd overlap A B` compares two masks.")
    sub = mask.add_subparsers(dest="mask_command", required=True, metavar="mask_command")

    p = add_parser(sub, "diff", "The coordinates that changed between two checkpoints (e.g. a full OPD run).",
                   """Streams the checkpoints tensor by tensor. Compares every linear layer but the output head unless
--target-modules says otherwise.""")
    p.add_argument("base", help=f"base checkpoint: {CHECKPOINT}")
    p.add_argument("tuned", help="tuned checkpoint, same forms")
    p.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    p.add_argument("--threshold", type=non_negative, default=1e-5,
                   help="an entry changed if |tuned - base| > threshold ('abs'), > threshold * rms(base) ('rel')")
    p.add_argument("--mode", choices=("abs", "rel", "changed"), default="abs",
                   help="'abs', 'rel' (relative to the weight's rms) or 'changed' (any change at all)")
    p.add_argument("--precision", choices=("raw", "bf16"), default="raw",
                   help="compare as stored ('raw') or both rounded to bf16 ('bf16': what a bf16 checkpoint shows)")
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="module names or suffixes to compare (PEFT's matching); default: every linear layer but "
                        "the head")
    p.add_argument("--json", metavar="PATH", nargs="?", const="-",
                   help="also write the kept fraction per module as JSON ('-': stdout)")
    p.set_defaults(func=diff)

    p = add_parser(sub, "prior", "A mask that needs no training run: near-zero (smallest |W|) or random coordinates.",
                   "The budget is split across modules FFN-heavy by default (--block-weights).")
    p.add_argument("model", help="model directory, Hub id, or 'embedded' (the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--kind", choices=("near_zero", "random"), default="near_zero", help="which prior")
    p.add_argument("--density", type=fraction, required=True, help="fraction of the targeted entries to keep")
    p.add_argument("--block-weights", default="ffn", choices=("ffn", "uniform"),
                   help="how the budget splits between blocks: 'ffn' (FFN-heavy) or 'uniform'")
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="module names or suffixes (PEFT's matching); default: every linear layer but the head")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prior")
    p.add_argument("--out", required=True, help="mask file to write (.safetensors)")
    p.set_defaults(func=prior)

    p = add_parser(sub, "stats", "Density of a mask by module, module type, block or layer.")
    p.add_argument("mask", help="mask file (.safetensors written by SparseMask.save or `sparse-opd mask ...`)")
    p.add_argument("--by", choices=("module", "type", "block", "layer"), default="block", help="grouping")
    p.add_argument("--json", metavar="PATH", nargs="?", const="-",
                   help="also write the table as JSON ('-': stdout instead of the table)")
    p.set_defaults(func=stats)

    p = add_parser(sub, "combine", "The union or intersection of two masks of the same model.")
    p.add_argument("a", help="first mask file")
    p.add_argument("b", help="second mask file")
    p.add_argument("--op", choices=("union", "intersection"), default="union", help="set operation")
    p.add_argument("--out", required=True, help="mask file to write")
    p.set_defaults(func=combine)
