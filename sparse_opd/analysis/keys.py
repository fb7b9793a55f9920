"""Names of the per-matrix numbers in a report (``report.json`` rows), defined once for the analyzer, its Markdown and
its plots. ``prefix`` is ``""`` for the delta, ``"null_"`` for its isotropic null, ``"expected_"`` for a random
expectation."""

from __future__ import annotations


def unchanged(mode: str, tau: float, prefix: str = "") -> str:
    """Fraction of entries with ``|D| <= tau`` as stored (``mode="raw"``) or as bf16 shows it (``"bf16"``)."""
    return f"{prefix}unchanged_{mode}_{tau:g}"


def near_zero_lift(change_set: str, q: float) -> str:
    """Near-zero lift at quantile ``q`` of a change set: ``raw``, ``bf16``, ``top10`` or their ``null_`` versions."""
    return f"near_zero_lift_{change_set}_q{q:g}"


def align(side: str, fraction: float | None = None, prefix: str = "") -> str:
    """Alignment share (``side``: left, right, both) at the report's subspace size, or at ``fraction``."""
    return f"{prefix}align_{side}" + (f"_f{fraction:g}" if fraction is not None else "")


def align_r(fraction: float | None = None) -> str:
    """The subspace size r used for an alignment column."""
    return "align_r" + (f"_f{fraction:g}" if fraction is not None else "")


def top_energy(k: int, prefix: str = "") -> str:
    return f"{prefix}top{k}_energy"


def rank_ratio(tau: float | None = None, prefix: str = "") -> str:
    return f"{prefix}rank_ratio" + (f"_tau{tau:g}" if tau is not None else "")


UNCHANGED_REL = "unchanged_rel_1e-3"
UNCHANGED_HALF_STEP = "unchanged_half_step"
