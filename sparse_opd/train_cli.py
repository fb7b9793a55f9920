"""`sparse-opd train`: the on-policy distillation job of `sparse_opd.job` (the same flags as
`examples/opd_math.py`)."""

from __future__ import annotations

SUMMARY = "Distill a teacher into a sparse delta of a student, on-policy (the job of examples/opd_math.py)."
DESCRIPTION = """Discovers the coordinates (a short dense OPD probe by default), evaluates the student and the teacher,
trains the sparse delta with SparseOPDTrainer, evaluates again, saves the adapter with its model card and prints a
summary. `sparse-opd train --help` lists every flag with its default; `--config NAME_OR_FILE` takes a preset
(cpu, smoke, gpu) or a YAML file of flags (TRL's --config); flags on the command line override it."""


def register(subparsers) -> None:
    from .cli import add_parser

    # `sparse-opd train ...` is forwarded to `sparse_opd.job.main` before argparse sees it (see `cli.main`): the job
    # has its own parser (TRL's, with --config files); this entry only lists the command.
    add_parser(subparsers, "train", SUMMARY, DESCRIPTION, add_help=False).set_defaults(func=lambda args: main([]))


def main(argv: list[str]) -> int:
    from .job import main as run_job

    return run_job(argv, prog="sparse-opd train")
