"""What the job prints: its own lines on the main process, library chatter only with --verbose, errors in one line."""

from __future__ import annotations

import argparse
import contextlib
import logging


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; every argument's help shows its default."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (its type's name if it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


def say(*args) -> None:
    """Print on the main process only."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(*args, flush=True)


def verbose_flag(argv: list[str]) -> bool:
    """Whether the command line asks for --verbose (read before parsing, so that parsing is quiet too)."""
    at = argv.index("--verbose") if "--verbose" in argv else None
    if at is None:
        return False
    value = argv[at + 1] if at + 1 < len(argv) else "true"
    return value.startswith("-") or value.lower() not in ("false", "0", "no")


class quiet:
    """Keep library chatter out of the job's output unless ``verbose``: Python warnings raised from the ecosystem's
    packages (deprecations and advice; a warning turned into an error still raises, and warnings from sparse_opd or
    the user's own code still show), transformers / datasets info logs, and progress bars other than the job's own.
    ERROR-level logs always show."""

    PACKAGES = ("transformers", "trl", "peft", "accelerate", "datasets", "torch", "bitsandbytes", "deepspeed",
                "huggingface_hub", "safetensors", "evaluate")

    def __init__(self, verbose: bool | list[str]):
        """``verbose``: a flag, or the command line (see `verbose_flag`)."""
        self.verbose = verbose_flag(verbose) if isinstance(verbose, list) else bool(verbose)

    def __enter__(self):
        import warnings

        if self.verbose:
            return self
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", module=rf"({'|'.join(self.PACKAGES)})(\..*)?$")
        from datasets.utils.logging import disable_progress_bar
        from transformers.utils import logging as hf_logging

        self._verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        disable_progress_bar()
        # DeepSpeed configures its logger when first imported (mid-run), so a filter, not a level
        logging.getLogger("DeepSpeed").addFilter(self._errors_only)
        return self

    @staticmethod
    def _errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    def __exit__(self, *exc):
        if not self.verbose:
            from datasets.utils.logging import enable_progress_bar
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(self._verbosity)
            hf_logging.enable_progress_bar()
            enable_progress_bar()
            logging.getLogger("DeepSpeed").removeFilter(self._errors_only)
            self._warnings.__exit__(*exc)
        return False


@contextlib.contextmanager
def errors_in_one_line(prog: str, keep_traceback: bool = False):
    """Bad input (a missing or unreadable file, a refused flag, an unknown preset, ...) ends the job with one line
    naming the problem; ``keep_traceback`` (--verbose, `sparse-opd --traceback`) re-raises it instead."""
    try:
        yield
    except (ValueError, OSError, ImportError) as err:
        if keep_traceback:
            raise
        raise SystemExit(f"{prog}: error: {one_line(err)} (--verbose for the traceback)") from None


@contextlib.contextmanager
def console(argv: list[str], prog: str, traceback: bool = False):
    """`quiet` and `errors_in_one_line` together, as the job runs them (``argv``: the command line)."""
    with quiet(argv) as output, errors_in_one_line(prog, output.verbose or traceback):
        yield output
