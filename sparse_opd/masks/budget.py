"""Split a coordinate budget across modules."""

from __future__ import annotations

import math
from collections.abc import Mapping

from .module_types import block_of

# Relative density per block. The paper puts 65-86% of OPD's update energy in FFN weights; weighting FFN density
# up by 1.5x moves a Llama-style budget from ~75% FFN (its parameter share) to ~82%.
FFN_HEAVY = {"ffn": 1.5, "attention": 1.0, "other": 1.0}


def resolve_block_weights(weights: str | Mapping[str, float] | None) -> dict[str, float]:
    if weights is None or weights == "uniform":
        return {"ffn": 1.0, "attention": 1.0, "other": 1.0}
    if weights == "ffn":
        return dict(FFN_HEAVY)
    if isinstance(weights, str):
        raise ValueError(f"unknown block weighting {weights!r}; use 'ffn', 'uniform' or a dict like {{'ffn': 2.0}}")
    out = {"ffn": 1.0, "attention": 1.0, "other": 1.0}
    for key, value in weights.items():
        if key not in out:
            raise ValueError(f"unknown block {key!r} in the block weights; the blocks are {sorted(out)}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or not math.isfinite(value):
            raise ValueError(f"block weight for {key!r} must be a finite number >= 0, got {value!r}")
        out[key] = float(value)
    return out


def parse_block_weights(weights: str | Mapping[str, float]) -> str | dict[str, float]:
    """A config's block weights, checked: ``"ffn"``, ``"uniform"``, a dict, or a JSON object given as a string (from
    a command line or a JSON file) returned as a dict. The one validation of every config that takes them."""
    if isinstance(weights, str) and weights.lstrip().startswith("{"):
        import json

        try:
            weights = json.loads(weights)
        except json.JSONDecodeError as err:
            raise ValueError(f"block weights are not a valid JSON object: {err}") from None
    if not isinstance(weights, (str, Mapping)):
        raise ValueError(f"block weights must be 'ffn', 'uniform' or an object like {{\"ffn\": 2.0}}, got {weights!r}")
    resolve_block_weights(weights)
    return weights if isinstance(weights, str) else dict(weights)


def allocate_budget(
    shapes: Mapping[str, tuple[int, ...]],
    density: float | None = None,
    total: int | None = None,
    block_weights: str | Mapping[str, float] | None = "ffn",
    module_densities: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Exact per-module coordinate counts.

    Either ``module_densities`` (name -> density, each rounded to the nearest count) or a global ``density`` /
    ``total`` split in proportion to ``numel * weight(block)`` by largest remainder, never above a module's size.
    Every module with a positive weight gets at least one coordinate.
    """
    if module_densities is not None:
        counts = {}
        for name, shape in shapes.items():
            if name not in module_densities:
                raise ValueError(f"module_densities has no entry for {name}")
            d = module_densities[name]
            if not 0 < d <= 1:
                raise ValueError(f"density for {name} must be in (0, 1], got {d}")
            counts[name] = max(1, round(d * math.prod(shape)))
        return counts
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    if (density is None) == (total is None):
        raise ValueError("give exactly one of density or total")
    if density is not None:
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        total = round(density * sum(numels.values()))
    if total < 1 or total > sum(numels.values()):
        raise ValueError(f"total must be in [1, {sum(numels.values())}], got {total}")
    w = resolve_block_weights(block_weights)
    mass = {name: n * w.get(block_of(name), 1.0) for name, n in numels.items()}
    counts = dict.fromkeys(numels, 0)
    remaining, active = total, {name for name, m in mass.items() if m > 0}
    # Water-filling: share in proportion to mass; modules that would overflow are capped and the rest re-split.
    while remaining > 0 and active:
        share_mass = sum(mass[n] for n in active)
        ideal = {n: remaining * mass[n] / share_mass for n in active}
        capped = {n for n in active if counts[n] + ideal[n] >= numels[n]}
        if capped:
            for n in capped:
                remaining -= numels[n] - counts[n]
                counts[n] = numels[n]
            active -= capped
            continue
        floors = {n: math.floor(ideal[n]) for n in active}
        leftover = remaining - sum(floors.values())
        order = sorted(active, key=lambda n: (ideal[n] - floors[n], n), reverse=True)
        for i, n in enumerate(order):
            counts[n] += floors[n] + (1 if i < leftover else 0)
        remaining = 0
    return counts
