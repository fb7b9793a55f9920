"""Set operations and overlap statistics between masks, with random-expectation baselines.

For one module with ``n`` entries and masks ``A``, ``B`` (sizes ``a``, ``b``, intersection ``i``):

- Jaccard ``J = i / (a + b - i)``; coverage of each side ``i / a`` and ``i / b``; overlap coefficient
  ``i / min(a, b)``.
- Random expectation: two independent uniformly random masks of the same sizes share ``E[i] = a * b / n``
  coordinates, so ``E[i / a] = b / n``, ``E[i / b] = a / n`` and ``J_rand ~= E[i] / (a + b - E[i])``. Every statistic
  is also given as observed / expected ("lift"): 1 means no more overlap than chance.
- Null (deltas only, `sparse_opd.analysis.delta_overlap`): uniform independence is the wrong chance level when
  visibility depends on the weight (through bf16 a small update shows only where |W| is small, for any two deltas).
  There the null is two independent isotropic random deltas with the same norms (each on a random support as large
  as its delta's), put through the same precision pipeline: their sizes and intersection give ``null_jaccard``, and
  ``jaccard_vs_null`` is observed / null.

Totals sum the counts over the modules both masks contain (expectations too, module by module).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .sparse_mask import SparseMask


def _check_compatible(a: SparseMask, b: SparseMask, name: str) -> None:
    if a.shapes[name] != b.shapes[name]:
        raise ValueError(f"{name}: masks were made for different shapes {a.shapes[name]} and {b.shapes[name]}")


def union(a: SparseMask, b: SparseMask) -> SparseMask:
    """Coordinates in either mask (modules of both)."""
    indices, shapes = {}, {}
    for name in dict.fromkeys([*a.modules(), *b.modules()]):
        if name in a and name in b:
            _check_compatible(a, b, name)
            indices[name] = torch.unique(torch.cat([a[name], b[name]]))
        else:
            indices[name] = (a if name in a else b)[name]
        shapes[name] = (a if name in a else b).shapes[name]
    return SparseMask(indices, shapes)


def intersection(a: SparseMask, b: SparseMask) -> SparseMask:
    """Coordinates in both masks; modules whose intersection is empty are dropped."""
    indices, shapes = {}, {}
    for name in a.modules():
        if name not in b:
            continue
        _check_compatible(a, b, name)
        common = a[name][torch.isin(a[name], b[name])]
        if common.numel():
            indices[name], shapes[name] = common, a.shapes[name]
    if not indices:
        raise ValueError("the masks share no coordinate: their intersection is empty")
    return SparseMask(indices, shapes)


_NULL_FIELDS = ("null_size_a", "null_size_b", "null_intersection")


@dataclass
class Overlap:
    size_a: int
    size_b: int
    intersection: int
    jaccard: float
    coverage_a: float  # |A & B| / |A|
    coverage_b: float  # |A & B| / |B|
    overlap_coefficient: float  # |A & B| / min(|A|, |B|)
    expected_intersection: float
    expected_jaccard: float
    expected_coverage_a: float
    expected_coverage_b: float
    null_size_a: int | None = None
    null_size_b: int | None = None
    null_intersection: int | None = None

    @property
    def null_jaccard(self) -> float | None:
        if self.null_intersection is None:
            return None
        union = self.null_size_a + self.null_size_b - self.null_intersection
        return self.null_intersection / union if union else float("nan")

    @property
    def jaccard_vs_null(self) -> float | None:
        null = self.null_jaccard
        if null is None:
            return None
        return self.jaccard / null if null else float("nan")

    @property
    def jaccard_lift(self) -> float:
        return self.jaccard / self.expected_jaccard if self.expected_jaccard else float("nan")

    @property
    def coverage_a_lift(self) -> float:
        return self.coverage_a / self.expected_coverage_a if self.expected_coverage_a else float("nan")

    @property
    def coverage_b_lift(self) -> float:
        return self.coverage_b / self.expected_coverage_b if self.expected_coverage_b else float("nan")

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(jaccard_lift=self.jaccard_lift, coverage_a_lift=self.coverage_a_lift,
                   coverage_b_lift=self.coverage_b_lift)
        if self.null_intersection is not None:
            out.update(null_jaccard=self.null_jaccard, jaccard_vs_null=self.jaccard_vs_null)
        else:
            for key in _NULL_FIELDS:
                out.pop(key)
        return out


def overlap_from_counts(a: int, b: int, i: int, expected: float, null: tuple[int, int, int] | None = None) -> Overlap:
    def ratio(x, y):
        return x / y if y else float("nan")

    return Overlap(
        size_a=a, size_b=b, intersection=i, jaccard=ratio(i, a + b - i), coverage_a=ratio(i, a),
        coverage_b=ratio(i, b), overlap_coefficient=ratio(i, min(a, b)), expected_intersection=expected,
        expected_jaccard=ratio(expected, a + b - expected), expected_coverage_a=ratio(expected, a),
        expected_coverage_b=ratio(expected, b), **dict(zip(_NULL_FIELDS, null or ())),
    )


def mask_overlap(a: SparseMask, b: SparseMask) -> dict:
    """``{"total": Overlap, "modules": {name: Overlap}}`` over the modules both masks contain."""
    common = [n for n in a.modules() if n in b]
    if not common:
        raise ValueError("the masks have no module in common; compare masks of the same model")
    per_module, totals = {}, [0, 0, 0, 0.0]
    for name in common:
        _check_compatible(a, b, name)
        size_a, size_b = a.count(name), b.count(name)
        inter = int(torch.isin(a[name], b[name]).sum())
        expected = size_a * size_b / a.numel(name)
        per_module[name] = overlap_from_counts(size_a, size_b, inter, expected)
        for k, v in enumerate((size_a, size_b, inter, expected)):
            totals[k] += v
    return {"total": overlap_from_counts(*totals[:3], totals[3]), "modules": per_module}
