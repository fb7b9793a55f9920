"""The mask of coordinates that changed between two checkpoints, streamed tensor by tensor.

An entry changed by the rule of `sparse_opd.masks.changes` (``|T - B| > threshold`` as stored, or as bfloat16
checkpoints show it with ``precision="bf16"``: updates below half a bf16 step of ``B`` vanish), the threshold being
``threshold`` (``mode="abs"``, the paper's 1e-5), ``threshold * rms(B)`` (``mode="rel"``) or 0 (``mode="changed"``:
any change).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from ..memory import release_freed_memory
from .changes import PRECISIONS, changed_entries, delta_of
from .checkpoints import CheckpointReader
from .sparse_mask import SparseMask, normalize_module_name
from .targets import checkpoint_targets

MODES = ("abs", "rel", "changed")


@dataclass
class DiffReport:
    """Per module: coordinates kept, weight size, and the kept fraction; plus modules with nothing kept."""

    kept: dict[str, int] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)

    def fraction(self, name: str) -> float:
        return self.kept[name] / self.numel[name]

    @property
    def total_fraction(self) -> float:
        return sum(self.kept.values()) / max(1, sum(self.numel.values()))

    def to_dict(self) -> dict:
        return {
            "modules": {n: {"kept": self.kept[n], "numel": self.numel[n], "fraction": self.fraction(n)}
                        for n in self.kept},
            "empty": self.empty,
            "total_fraction": self.total_fraction,
        }


def changed_coordinates(base: torch.Tensor, tuned: torch.Tensor, threshold: float, mode: str, precision: str):
    """Flat indices of the changed entries of one weight (`sparse_opd.masks.changes`; ``mode`` scales the
    threshold: ``"rel"`` by rms(base), ``"changed"`` sets it to 0)."""
    if mode == "changed":
        threshold = 0.0
    elif mode == "rel":
        threshold = threshold * float(base.double().pow(2).mean().sqrt())
    changed = changed_entries(base, delta_of(base, tuned), threshold, precision)
    return torch.nonzero(changed.reshape(-1)).reshape(-1)


def _compared_names(base_ckpt: CheckpointReader, tuned_ckpt: CheckpointReader, target_modules) -> list[str]:
    """The base checkpoint's tensors the rule of `sparse_opd.masks.targets` selects, all present in the tuned one."""
    names = checkpoint_targets({n: base_ckpt.shape(n) for n in base_ckpt.names()}, base_ckpt.folder, target_modules)
    missing = [n for n in names if n not in tuned_ckpt]
    if missing:
        raise ValueError(
            f"{len(missing)} weight(s) of the base checkpoint are missing from the tuned one, e.g. {missing[:3]}: "
            "compare two checkpoints of the same architecture"
        )
    if not names:
        raise ValueError(f"no 2-D weight of {base_ckpt.source} matches target_modules={target_modules}")
    if target_modules is not None and not isinstance(target_modules, str):
        found = {normalize_module_name(n) for n in names}
        absent = [t for t in target_modules if t not in found and not any(f.split(".")[-1] == t for f in found)]
        if absent:
            raise ValueError(f"target_modules {absent} name no 2-D weight of the checkpoint {base_ckpt.source}")
    return names


def mask_from_diff(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    threshold: float = 1e-5,
    mode: str = "abs",
    precision: str = "raw",
    target_modules=None,
    return_report: bool = False,
    progress: bool = False,
):
    """See `SparseMask.from_diff`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold}")
    base_ckpt, tuned_ckpt = CheckpointReader(base), CheckpointReader(tuned)
    names = _compared_names(base_ckpt, tuned_ckpt, target_modules)
    report, indices, shapes = DiffReport(), {}, {}
    iterator = names
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(names, desc="diff", unit="tensor")
    for name in iterator:
        b, t = base_ckpt.get(name), tuned_ckpt.get(name)
        if b.shape != t.shape:
            raise ValueError(
                f"{name}: shape {tuple(b.shape)} in the base but {tuple(t.shape)} in the tuned checkpoint")
        if not (b.is_floating_point() and t.is_floating_point()):
            raise ValueError(f"{name}: not a floating-point weight ({b.dtype}, {t.dtype})")
        bad = int((~torch.isfinite(t)).sum()) + int((~torch.isfinite(b)).sum())
        if bad:
            raise ValueError(
                f"{name}: {bad} non-finite (NaN or inf) entries; a diverged checkpoint has no meaningful diff mask"
            )
        idx = changed_coordinates(b, t, threshold, mode, precision)
        module = normalize_module_name(name)
        report.kept[module], report.numel[module] = int(idx.numel()), b.numel()
        del b, t
        release_freed_memory()
        if idx.numel() == 0:
            report.empty.append(module)
            continue
        indices[module], shapes[module] = idx, tuple(base_ckpt.shape(name))
    if not indices:
        raise ValueError(f"no coordinate changed by more than the threshold ({mode}, {precision}, {threshold})")
    mask = SparseMask(indices, shapes)
    return (mask, report) if return_report else mask
