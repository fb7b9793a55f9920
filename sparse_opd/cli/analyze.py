"""`sparse-opd analyze`: the geometry of one weight delta, written as report.json, report.md and plots."""

from __future__ import annotations

import argparse

from .common import CliError, add_parser, check_input, check_output_dir, fraction


def _check_device(device: str) -> str:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device}: no CUDA GPU is available here; use --device cpu (or auto)")
    return device


def run(args):
    check_input(args.base, "base checkpoint", directory=True, hub=True)
    check_input(args.tuned, "tuned checkpoint", directory=True, hub=True)
    check_output_dir(args.out, "--out")
    device = _check_device(args.device)
    from ..analysis import analyze_delta

    report = analyze_delta(args.base, args.tuned, rank_fraction=args.rank_fraction, device=device,
                           progress=not args.quiet)
    report.save(args.out, plots=args.plots)
    print(report.summary())
    if report.skipped:
        print(f"skipped {len(report.skipped)} tensor(s); see report.md")
    print(f"wrote {args.out}/report.json, report.md" + (" and plots" if args.plots else ""))


def register(subparsers) -> None:
    p = add_parser(subparsers, "analyze", "The geometry of a weight delta (checkpoint pair, or base + PEFT adapter).",
                   """Relative norm, sparsity as stored and through bf16, rank and spectral concentration, alignment
with the base weights' top singular subspaces, near-zero bias and module/layer breakdown, each beside a same-norm
random null. Writes report.json, report.md and plots to --out; streams one weight at a time.""")
    p.add_argument("base", help="base checkpoint: safetensors file, directory (sharded or not) or Hub id")
    p.add_argument("tuned", help="tuned checkpoint (same forms), or a PEFT adapter directory (sparse delta or LoRA)")
    p.add_argument("--out", required=True, help="output directory (created if needed)")
    p.add_argument("--rank-fraction", type=fraction, default=0.05,
                   help="size of the source subspaces: r = max(1, int(fraction * min(m, n)))")
    p.add_argument("--device", default="auto", help="where SVDs run: 'auto' (a GPU if there is one), 'cpu', 'cuda'")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
