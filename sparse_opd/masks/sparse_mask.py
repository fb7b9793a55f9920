"""`SparseMask`: which coordinates of which weights may move."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .encoding import decode_indices, encode_indices, validate_flat_indices

MASK_FORMAT = "sparse_opd.mask/1"
_PREFIXES = ("base_model.model.",)
_SUFFIXES = (".weight",)


def normalize_module_name(name: str) -> str:
    """Strip PEFT's wrapper prefix and a trailing ``.weight`` so that checkpoint keys and module names agree."""
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    # a layer already wrapped by PEFT keeps its weight in `<name>.base_layer`
    return name.removesuffix(".base_layer")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}/{tensor.dtype}/{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def check_shape(shape, name: str) -> tuple[int, int]:
    """A weight shape as a tuple of two positive ints, or a `ValueError` naming the module."""
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: the weight shape {shape!r} is not a pair of integers") from None
    if len(dims) != 2 or min(dims) < 1:
        raise ValueError(f"{name}: a weight shape must be two positive sizes (rows, cols), got {dims}")
    return dims


@dataclass
class SparseMask:
    """Module name -> sorted unique flat indices into that module's weight, plus the weight's shape.

    Flat indices address the weight as stored (row-major over ``weight.shape``; for GPT-2's ``Conv1D`` that is
    ``(in_features, out_features)``), so a diff of two checkpoints maps onto a mask without transposes.
    """

    indices: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self):
        if set(self.indices) != set(self.shapes):
            missing = set(self.indices) ^ set(self.shapes)
            raise ValueError(
                f"SparseMask needs a shape for every module and vice versa; mismatched: {sorted(missing)}")
        clean_idx, clean_shapes, given = {}, {}, {}
        for name in self.indices:
            key = normalize_module_name(name)
            if key in given:
                raise ValueError(f"{given[key]!r} and {name!r} name the same module {key!r}; give each module once")
            given[key] = name
            shape = check_shape(self.shapes[name], key)
            clean_idx[key] = validate_flat_indices(self.indices[name], math.prod(shape), name=key)
            clean_shapes[key] = shape
        self.indices, self.shapes = clean_idx, clean_shapes

    # construction -------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, masks: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]] | None = None):
        """Build from ``name -> bool tensor`` (shape = weight shape) or ``name -> flat indices`` (needs ``shapes``)."""
        indices, out_shapes = {}, {}
        for name, value in masks.items():
            value = torch.as_tensor(value)
            key = normalize_module_name(name)
            if value.dtype == torch.bool:
                if shapes is not None and key in shapes and tuple(shapes[key]) != tuple(value.shape):
                    raise ValueError(
                        f"{key}: boolean mask has shape {tuple(value.shape)} but the weight has shape "
                        f"{tuple(shapes[key])}"
                    )
                indices[name] = torch.nonzero(value.reshape(-1)).reshape(-1)
                out_shapes[name] = tuple(value.shape)
            else:
                if shapes is None or key not in shapes:
                    raise ValueError(
                        f"{key}: flat indices need the weight's shape; pass shapes={{'{key}': (out, in)}} "
                        "or give a boolean mask of the weight's shape"
                    )
                indices[name] = value
                out_shapes[name] = tuple(shapes[key])
        return cls(indices, out_shapes)

    @classmethod
    def from_diff(cls, base, tuned, threshold: float = 1e-5, mode: str = "abs", precision: str = "raw",
                  target_modules=None, return_report: bool = False, progress: bool = False):
        """Coordinates that changed between two checkpoints (local file/dir, sharded or not, or Hub ids), streamed
        tensor by tensor. ``mode``: ``"abs"`` (|delta| > threshold), ``"rel"`` (> threshold * rms(W_base)) or
        ``"changed"`` (any change); ``precision``: ``"raw"`` or ``"bf16"`` (bf16(tuned) vs bf16(base)). With
        ``return_report=True`` also returns a `DiffReport` of the kept fraction per module."""
        from .diff import mask_from_diff

        return mask_from_diff(base, tuned, threshold, mode, precision, target_modules, return_report, progress)

    def union(self, other: SparseMask) -> SparseMask:
        from .overlap import union

        return union(self, other)

    def intersection(self, other: SparseMask) -> SparseMask:
        from .overlap import intersection

        return intersection(self, other)

    def overlap(self, other: SparseMask) -> dict:
        """Jaccard, coverages and overlap coefficient against their random expectations (see `mask_overlap`)."""
        from .overlap import mask_overlap

        return mask_overlap(self, other)

    def density_by(self, by: str = "block") -> dict:
        """Density per ``"module"``, ``"type"``, ``"block"`` or ``"layer"``."""
        from .stats import density_by

        return density_by(self, by)

    # queries --------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[str]:
        return iter(self.indices)

    def __contains__(self, name: str) -> bool:
        return normalize_module_name(name) in self.indices

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.indices[normalize_module_name(name)]

    def modules(self) -> list[str]:
        return list(self.indices)

    def count(self, name: str | None = None) -> int:
        """Selected coordinates in one module, or in all of them."""
        if name is not None:
            return int(self[name].numel())
        return sum(int(v.numel()) for v in self.indices.values())

    def numel(self, name: str | None = None) -> int:
        """Weight entries in one module, or in all masked modules."""
        if name is not None:
            return math.prod(self.shapes[normalize_module_name(name)])
        return sum(math.prod(s) for s in self.shapes.values())

    def density(self, name: str | None = None) -> float:
        return self.count(name) / self.numel(name)

    def counts(self) -> dict[str, int]:
        return {name: int(idx.numel()) for name, idx in self.indices.items()}

    def to_bool(self, name: str) -> torch.Tensor:
        key = normalize_module_name(name)
        out = torch.zeros(math.prod(self.shapes[key]), dtype=torch.bool)
        out[self.indices[key]] = True
        return out.view(self.shapes[key])

    def __eq__(self, other) -> bool:
        if not isinstance(other, SparseMask):
            return NotImplemented
        return self.shapes == other.shapes and all(
            torch.equal(self.indices[k], other.indices[k]) for k in self.indices)

    def __repr__(self) -> str:
        return f"SparseMask(modules={len(self)}, coordinates={self.count()}, density={self.density():.4%})"

    # files ----------------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, encoding: str = "auto") -> None:
        """Write a safetensors file: ``<module>.indices`` (encoded uint8 stream) and ``<module>.shape`` (int64)."""
        tensors = {}
        for name, idx in self.indices.items():
            shape = self.shapes[name]
            tensors[f"{name}.indices"] = encode_indices(idx, math.prod(shape), encoding)
            tensors[f"{name}.shape"] = torch.tensor(shape, dtype=torch.int64)
        save_file(tensors, str(path), metadata={"format": MASK_FORMAT, "sha256": _digest(tensors)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparseMask:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"mask file {path} does not exist")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as err:  # noqa: BLE001 (safetensors' own error types for truncated or foreign files)
            raise ValueError(f"{path} is not a readable safetensors mask file: {err}") from None
        with handle as f:
            if (f.metadata() or {}).get("format") != MASK_FORMAT:
                raise ValueError(f"{path} is not a sparse_opd mask file (metadata format != {MASK_FORMAT!r})")
            keys = set(f.keys())
            names = sorted({k.rsplit(".", 1)[0] for k in keys})
            indices, shapes = {}, {}
            for name in names:
                if f"{name}.shape" not in keys or f"{name}.indices" not in keys:
                    raise ValueError(
                        f"{path}: module {name} lacks its .shape or .indices tensor (corrupted mask file)")
                raw_shape = f.get_tensor(f"{name}.shape")
                if raw_shape.is_floating_point() or raw_shape.numel() != 2:
                    raise ValueError(f"{path}: module {name} has a malformed shape tensor {raw_shape.tolist()[:4]}")
                shape = check_shape(raw_shape.tolist(), name)
                indices[name] = decode_indices(f.get_tensor(f"{name}.indices"), math.prod(shape), name=name)
                shapes[name] = shape
            expected = (f.metadata() or {}).get("sha256")
            if expected and expected != _digest({k: f.get_tensor(k) for k in keys}):
                raise ValueError(f"{path}: the mask's contents do not match its checksum (a corrupted file)")
        return cls(indices, shapes)
