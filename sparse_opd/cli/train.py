"""`sparse-opd train`: the on-policy distillation job of `sparse_opd.job`, with its flags parsed by TRL's parser."""

from __future__ import annotations

from .common import add_parser

SUMMARY = "Distill a teacher into a sparse delta of a student, on-policy (the job of examples/opd_math.py)."
DESCRIPTION = """Discovers the coordinates (a short dense OPD probe by default), evaluates the student and the teacher,
trains the sparse delta with SparseOPDTrainer, evaluates again, saves the adapter with its model card and prints a
summary. `sparse-opd train --help` lists every flag with its default; `--config NAME_OR_FILE` takes a preset
(cpu, smoke, gpu) or a YAML file of flags (TRL's --config); flags on the command line override it."""


def register(subparsers) -> None:
    # the job's flags are TRL's parser's, not argparse's here: everything after `train` goes to it
    add_parser(subparsers, "train", SUMMARY, DESCRIPTION, add_help=False).set_defaults(func=run, passes_rest=True)


def run(args) -> int:
    from ..job import main

    return main(args.rest, prog="sparse-opd train", traceback=args.traceback)
