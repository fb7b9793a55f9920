"""Where two deltas of the same base change the same coordinates, streamed one weight at a time."""

from __future__ import annotations

from collections import defaultdict

import torch

from ..masks.module_types import block_of
from ..masks.overlap import Overlap, overlap_from_counts
from ..memory import release_freed_memory
from . import metrics as M
from .sources import open_source

PRECISIONS = ("raw", "bf16")


def changed_entries(w: torch.Tensor, d: torch.Tensor, threshold: float, precision: str) -> torch.Tensor:
    """Boolean map of the entries a delta changed: ``|D| > threshold`` as stored, or after a bf16 round trip of
    ``W`` and ``W + D`` (``precision="bf16"``: what two bf16 checkpoints would show)."""
    if precision == "bf16":
        d = M.bf16_visible(w, d)
    elif precision != "raw":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return d.abs() > threshold


def delta_overlap(base, tuned_a, tuned_b, *, threshold: float = 1e-5, precision: str = "raw") -> dict:
    """Overlap of the coordinates changed by ``tuned_a - base`` and ``tuned_b - base``.

    ``tuned_a`` / ``tuned_b``: checkpoints, state dicts or PEFT adapter directories (any mix). Returns
    ``{"total": Overlap, "by_block": {block: Overlap}, "modules": {name: Overlap}, "skipped": [...]}``; each `Overlap`
    carries the intersection and Jaccard index beside their expectation for two independent random sets of the same
    sizes (``|A| |B| / numel`` per matrix).
    """
    if not (threshold >= 0):
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    a, b = open_source(base, tuned_a), open_source(base, tuned_b)
    names_b = set(b.names())
    common = [n for n in a.names() if n in names_b]
    if not common:
        raise ValueError("the two deltas share no weight matrix; compare deltas of the same base model")
    modules, blocks, total = {}, defaultdict(lambda: [0, 0, 0, 0.0]), [0, 0, 0, 0.0]
    for name in common:
        pair_a = a.pair(name)
        if pair_a is None:
            continue
        w, d = pair_a
        changed_a = changed_entries(w, d, threshold, precision)
        del d
        pair_b = b.pair(name)
        if pair_b is None:
            continue
        changed_b = changed_entries(w, pair_b[1], threshold, precision)
        del pair_b, w
        counts = [int(changed_a.sum()), int(changed_b.sum()), int((changed_a & changed_b).sum())]
        counts.append(counts[0] * counts[1] / changed_a.numel())
        del changed_a, changed_b
        module = name.removesuffix(".weight")
        modules[module] = overlap_from_counts(*counts)
        for acc in (total, blocks[block_of(module)]):
            for i, value in enumerate(counts):
                acc[i] += value
        release_freed_memory()
    skipped = sorted(set(a.skipped) | set(b.skipped))
    if not modules:
        raise ValueError(f"no weight matrix could be compared; skipped: {skipped}")
    return {"total": overlap_from_counts(*total), "by_block": {k: overlap_from_counts(*v) for k, v in blocks.items()},
            "modules": modules, "skipped": skipped}


def overlap_markdown(result: dict, label_a: str = "A", label_b: str = "B") -> str:
    def row(name, o: Overlap):
        return (f"| {name} | {o.size_a:,} | {o.size_b:,} | {o.intersection:,} | {o.jaccard:.4f} | "
                f"{o.expected_jaccard:.4f} | {o.jaccard_lift:.2f} | {o.coverage_a:.3f} | {o.coverage_b:.3f} |")

    lines = [f"| | changed in {label_a} | changed in {label_b} | both | Jaccard | Jaccard if random | lift | "
             f"share of {label_a} in {label_b} | share of {label_b} in {label_a} |", "|---|" + "---:|" * 8,
             row("total", result["total"])]
    lines += [row(block, o) for block, o in sorted(result["by_block"].items())]
    return "\n".join(lines) + "\n"
