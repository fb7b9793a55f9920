"""What the tests share: tiny models and tokenizer, a local Hub and vLLM stand-ins, broken-file batteries, and the
workers the multi-process tests launch. Imported as `tests.helpers.<module>` (pyproject's pytest `pythonpath`
puts the repository root on `sys.path`)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root: `tests.helpers` imports from here
HELPERS = Path(__file__).resolve().parent


def with_root_on_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the repository root first on PYTHONPATH, for a subprocess that imports `tests.helpers`."""
    return {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])}
