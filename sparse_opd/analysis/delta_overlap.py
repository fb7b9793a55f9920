"""Where two deltas of the same base change the same coordinates, streamed one weight at a time."""

from __future__ import annotations

from collections import defaultdict

import torch

from ..masks.changes import PRECISIONS, changed_entries
from ..masks.module_types import block_of
from ..masks.overlap import Overlap, overlap_from_counts
from ..memory import release_freed_memory
from . import metrics as M
from .sources import open_source


def delta_overlap(base, tuned_a, tuned_b, *, threshold: float = 1e-5, precision: str = "raw", null: bool = True,
                  seed: int = 0) -> dict:
    """Overlap of the coordinates changed by ``tuned_a - base`` and ``tuned_b - base``.

    ``tuned_a`` / ``tuned_b``: checkpoints, state dicts or PEFT adapter directories (any mix). Returns
    ``{"total": Overlap, "by_block": {block: Overlap}, "modules": {name: Overlap}, "skipped": [...]}``; each `Overlap`
    carries the intersection and Jaccard index beside their expectation for two independent random sets of the same
    sizes (``|A| |B| / numel`` per matrix), and (``null=True``) beside the overlap of two independent isotropic random
    deltas with the same per-matrix norms put through the same threshold and precision (``null_jaccard``): the chance
    level when visibility depends on ``W``, as it does in bf16 (on a random support as large as each delta's).
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
    generator = torch.Generator().manual_seed(seed)
    modules, blocks, total = {}, defaultdict(_zero_counts), _zero_counts()
    for name in common:
        pair_a = a.pair(name)
        if pair_a is None:
            continue
        w, d = pair_a
        changed_a = changed_entries(w, d, threshold, precision)
        null_a = changed_entries(w, _random_delta_like(d, generator), threshold, precision) if null else None
        del d
        pair_b = b.pair(name)
        if pair_b is None:
            continue
        changed_b = changed_entries(w, pair_b[1], threshold, precision)
        null_b = changed_entries(w, _random_delta_like(pair_b[1], generator), threshold, precision) if null else None
        del pair_b, w
        counts = _counts(changed_a, changed_b)
        counts.append(counts[0] * counts[1] / changed_a.numel())
        counts += _counts(null_a, null_b) if null else [0, 0, 0]
        del changed_a, changed_b, null_a, null_b
        module = name.removesuffix(".weight")
        modules[module] = _overlap(counts, null)
        for acc in (total, blocks[block_of(module)]):
            for i, value in enumerate(counts):
                acc[i] += value
        release_freed_memory()
    skipped = sorted(set(a.skipped) | set(b.skipped))
    if not modules:
        raise ValueError(f"no weight matrix could be compared; skipped: {skipped}")
    return {"total": _overlap(total, null), "by_block": {k: _overlap(v, null) for k, v in blocks.items()},
            "modules": modules, "skipped": skipped}


def _random_delta_like(d: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Isotropic Gaussian noise with ``D``'s norm on a random support as large as ``D``'s (a sparse adapter's null
    must change as few entries as the adapter does; a dense delta's null is dense)."""
    null = M.isotropic_like(d, generator)
    nonzero = int(torch.count_nonzero(d))
    if nonzero < d.numel():
        null *= torch.rand(d.shape, generator=generator) < nonzero / d.numel()
        norm = M.energy(null) ** 0.5
        if norm:
            null *= M.energy(d) ** 0.5 / norm
    return null


def _zero_counts() -> list:
    return [0, 0, 0, 0.0, 0, 0, 0]  # |A|, |B|, |A & B|, E|A & B| if random, then |A|, |B|, |A & B| of the null


def _counts(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    return [int(a.sum()), int(b.sum()), int((a & b).sum())]


def _overlap(counts: list, null: bool) -> Overlap:
    return overlap_from_counts(*counts[:4], null=tuple(counts[4:]) if null else None)


def overlap_markdown(result: dict, label_a: str = "A", label_b: str = "B") -> str:
    with_null = result["total"].null_intersection is not None

    def row(name, o: Overlap):
        cells = (f"| {name} | {o.size_a:,} | {o.size_b:,} | {o.intersection:,} | {o.jaccard:.4f} | "
                 f"{o.expected_jaccard:.4f} | {o.jaccard_lift:.2f} | ")
        if with_null:
            cells += f"{o.null_jaccard:.4f} | {o.jaccard_vs_null:.2f} | "
        return cells + f"{o.coverage_a:.3f} | {o.coverage_b:.3f} |"

    header = f"| | changed in {label_a} | changed in {label_b} | both | Jaccard | Jaccard if random | lift | "
    if with_null:
        header += "Jaccard of random deltas, same norms and precision | Jaccard / that | "
    header += f"share of {label_a} in {label_b} | share of {label_b} in {label_a} |"
    lines = [header, "|---|" + "---:|" * (10 if with_null else 8), row("total", result["total"])]
    lines += [row(block, o) for block, o in sorted(result["by_block"].items())]
    return "\n".join(lines) + "\n"
