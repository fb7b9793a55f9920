"""Density of a mask by module, module type (q/k/v/o/gate/up/down), block (attention/FFN) and layer."""

from __future__ import annotations

from collections import defaultdict

from .module_types import block_of, layer_index, module_type
from .sparse_mask import SparseMask

GROUPINGS = ("module", "type", "block", "layer")


def density_by(mask: SparseMask, by: str = "block") -> dict[str, dict]:
    """``group -> {"count", "numel", "density", "share"}``; ``share`` is the group's fraction of all coordinates."""
    if by not in GROUPINGS:
        raise ValueError(f"by must be one of {GROUPINGS}, got {by!r}")
    key = {
        "module": lambda n: n,
        "type": module_type,
        "block": block_of,
        "layer": lambda n: str(layer_index(n)) if layer_index(n) is not None else "none",
    }[by]
    counts, numels = defaultdict(int), defaultdict(int)
    for name in mask.modules():
        counts[key(name)] += mask.count(name)
        numels[key(name)] += mask.numel(name)
    total = mask.count()
    order = sorted(counts, key=lambda g: (len(g), g)) if by == "layer" else sorted(counts)
    return {
        g: {"count": counts[g], "numel": numels[g], "density": counts[g] / numels[g], "share": counts[g] / total}
        for g in order
    }
