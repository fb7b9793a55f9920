"""Metrics by name: the packaged `math_accuracy`, any `evaluate` module, or a Python callable.

`load_scorer(metric)` accepts
- `None` or `"math_accuracy"`: the packaged metric (numeric answers; flexible and strict scores, format errors);
- a local `evaluate` module (a folder holding `<name>.py`, or the `.py` file itself), or a name `evaluate.load`
  resolves (Hub names need the network);
- `"package.module:function"` or a callable: called as ``function(predictions=[...], references=[...])``, returning
  a dict of scores, one number, or one number per example (their mean is the score, and gains are paired on them);
- an object with `.compute(predictions=..., references=...)` (a loaded `evaluate` module).

A `Scorer` returns `Scores`: every number the metric gave, the headline one, and per-example scores when the metric
gives them (the packaged metric's `correct`, or a list a metric returns under `per_example` / `scores`).
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

METRIC_DIR = Path(__file__).parent / "metrics" / "math_accuracy"
PACKAGED = "math_accuracy"
_HEADLINES = ("accuracy", "exact_match", "score", "f1", "rougeL", "bleu")
_PER_EXAMPLE_KEYS = ("correct", "per_example", "scores")


def metric_path() -> str:
    """Local path of the `math_accuracy` metric module, for `evaluate.load(metric_path())` (works offline)."""
    return str(METRIC_DIR)


def load_metric():
    """The packaged `math_accuracy` metric as an `evaluate` module, loaded by local path."""
    import evaluate

    return evaluate.load(metric_path())


@dataclass
class Scores:
    """What a metric said about a list of predictions: all its numbers, which one is the headline, and the
    per-example scores (None when the metric gives only aggregates)."""

    values: dict[str, float]
    headline: str
    per_example: list[float] | None = None

    @property
    def score(self) -> float:
        return self.values[self.headline]


class Scorer:
    """A metric by name; call it with ``(predictions, references)`` for `Scores`."""

    def __init__(self, name: str, compute, packaged: bool = False):
        self.name = name
        self._compute = compute
        self.packaged = packaged

    def __call__(self, predictions: list[str], references: list) -> Scores:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        extra = {"per_example": True} if self.packaged else {}
        return _as_scores(self.name, self._compute(predictions=predictions, references=references, **extra),
                          len(predictions))

    def __repr__(self) -> str:
        return f"Scorer({self.name!r})"


def _as_scores(name: str, raw, n: int) -> Scores:
    if isinstance(raw, bool) or raw is None:
        raise TypeError(
            f"metric {name} returned {raw!r}; return a dict of scores, a number, or one number per example")
    if isinstance(raw, (int, float)):
        return Scores({"score": float(raw)}, "score")
    if isinstance(raw, (list, tuple)):
        per_example = _numbers(name, raw, n)
        return Scores({"score": sum(per_example) / n}, "score", per_example)
    if not isinstance(raw, dict):
        raise TypeError(f"metric {name} returned a {type(raw).__name__}; return a dict of scores, a number, or one "
                        "number per example")
    per_example = next((_numbers(name, raw[k], n) for k in _PER_EXAMPLE_KEYS if isinstance(raw.get(k), list)), None)
    values = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not values and per_example is not None:
        values["score"] = sum(per_example) / n
    if not values:
        raise TypeError(f"metric {name} returned no number (keys: {sorted(raw)}); return at least one score")
    headline = next((k for k in _HEADLINES if k in values), next(iter(values)))
    return Scores(values, headline, per_example)


def _numbers(name: str, values, n: int) -> list[float]:
    if len(values) != n:
        raise ValueError(f"metric {name} gave {len(values)} per-example scores for {n} examples")
    out = [float(v) for v in values]
    if any(math.isnan(v) for v in out):
        raise ValueError(f"metric {name} gave a NaN per-example score")
    return out


def load_scorer(metric=None) -> Scorer:
    """A `Scorer` for `metric` (see the module docstring for what may be named)."""
    if metric is None or metric == PACKAGED:
        return Scorer(PACKAGED, load_metric().compute, packaged=True)
    if hasattr(metric, "compute"):
        return Scorer(getattr(metric, "name", type(metric).__name__), metric.compute)
    if callable(metric):
        return Scorer(getattr(metric, "__qualname__", repr(metric)), metric)
    if not isinstance(metric, str) or not metric:
        raise TypeError(f"a metric is a name, a path, 'package.module:function' or a callable; got {metric!r}")
    if ":" in metric and not os.path.exists(metric):
        return Scorer(metric, _import_callable(metric))
    return Scorer(metric, _load_evaluate_module(metric).compute)


def _import_callable(spec: str):
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"metric {spec!r}: write a callable as 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"metric {spec!r}: cannot import {module_name!r} ({err}); make it importable (installed or "
                         "on PYTHONPATH)") from None
    function = module
    for part in attribute.split("."):
        function = getattr(function, part, None)
        if function is None:
            raise ValueError(f"metric {spec!r}: {module_name} has no attribute {attribute!r}")
    if not callable(function):
        raise ValueError(f"metric {spec!r} is a {type(function).__name__}, not a callable")  # user input: ValueError
    return function


def _load_evaluate_module(name: str):
    import evaluate

    local = os.path.exists(name) or os.sep in name or name.startswith(".") or name.endswith(".py")
    try:
        return evaluate.load(name)
    except (OSError, ImportError, ValueError) as err:  # no module / no network: FileNotFoundError, ConnectionError
        where = "the local module" if local else "the Hub (needs the network)"
        raise ValueError(f"metric {name!r} could not be loaded from {where}: {' '.join(str(err).split())[:200]}; "
                         "name a local evaluate module folder or a callable as 'package.module:function'") from None
