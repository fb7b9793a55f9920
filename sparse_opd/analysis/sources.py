"""Where deltas come from: two checkpoints, a base plus a PEFT adapter (sparse delta or LoRA), or two state dicts.

Every source yields ``(name, W_base, D)`` one weight at a time (float32), so memory holds a few tensors, not a model;
tensors that cannot be compared are collected in ``skipped`` with the reason instead of stopping the analysis.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping

import torch
from safetensors import safe_open

from ..masks.checkpoints import CheckpointReader
from ..masks.encoding import decode_indices


class _Weights:
    """Uniform read access to a checkpoint (path / Hub id) or an in-memory state dict."""

    def __init__(self, source):
        self.state = source if isinstance(source, Mapping) else None
        self.reader = None if self.state is not None else CheckpointReader(source)

    def names(self) -> list[str]:
        return list(self.state) if self.state is not None else self.reader.names()

    def __contains__(self, name) -> bool:
        return name in (self.state if self.state is not None else self.reader)

    def get(self, name) -> torch.Tensor:
        return self.state[name] if self.state is not None else self.reader.get(name)


class DeltaSource:
    """Base class: iterate ``(name, W_base, D)``; ``skipped`` lists ``(name, reason)``."""

    def __init__(self):
        self.skipped: list[tuple[str, str]] = []

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def names(self) -> list[str]:
        """Tensor names in iteration order (some may still be skipped when read)."""
        raise NotImplementedError

    def pair(self, name: str):
        raise NotImplementedError


class CheckpointPair(DeltaSource):
    """``D = W_tuned - W_base`` for every 2-D float tensor present in both (checkpoints or state dicts)."""

    def __init__(self, base, tuned):
        super().__init__()
        self.base, self.tuned = _Weights(base), _Weights(tuned)
        self._names = []
        for name in self.base.names():
            if name not in self.tuned:
                self.skipped.append((name, "missing from the tuned checkpoint"))
            else:
                self._names.append(name)
        self.skipped += [(n, "missing from the base checkpoint") for n in self.tuned.names() if n not in self.base]

    def __len__(self) -> int:
        return len(self._names)

    def names(self) -> list[str]:
        return list(self._names)

    def pair(self, name: str):
        """``(W_base, D)`` of one tensor as float32, or ``None`` (recorded in ``skipped``) if it is not analyzable."""
        w, t = self.base.get(name), self.tuned.get(name)
        if w.dim() != 2:
            return None  # biases, norms, scalars: not matrices
        if not (w.is_floating_point() and t.is_floating_point()):
            self.skipped.append((name, f"not floating point ({w.dtype}, {t.dtype})"))
            return None
        if w.shape != t.shape:
            self.skipped.append((name, f"shape {tuple(w.shape)} in the base, {tuple(t.shape)} in the tuned"))
            return None
        w, d = w.float(), t.float()
        if d is t and self.tuned.state is not None:
            return w, d - w  # a caller's state dict is never written to
        return w, d.sub_(w)  # read from a file, or a fresh float32 copy: ours to turn into the delta in place

    def __iter__(self):
        for name in self._names:
            pair = self.pair(name)
            if pair is not None:
                yield name, *pair
            pair = None  # drop the tensors before reading the next pair


def _adapter_tensors(adapter_dir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{adapter_dir} has no adapter_model.safetensors")
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open)


def read_adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(str(adapter_dir), "adapter_config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    with open(path) as f:
        return json.load(f)


class AdapterDeltas(DeltaSource):
    """Each adapted module's delta built from the adapter file alone (no model is merged), beside its base weight.

    Sparse delta: ``D = scatter(indices, values)``. LoRA: ``D = scale * B @ A`` with ``scale = alpha / r`` (or
    ``alpha / sqrt(r)`` with rsLoRA), transposed for ``fan_in_fan_out`` layers (GPT-2 Conv1D).
    """

    def __init__(self, base, adapter_dir):
        super().__init__()
        self.config = read_adapter_config(adapter_dir)
        self.kind = self.config.get("peft_type")
        if self.kind not in ("SPARSE_DELTA", "LORA"):
            raise ValueError(f"{adapter_dir}: peft_type {self.kind!r} is not supported (SPARSE_DELTA or LORA)")
        self.base = _Weights(base)
        self.tensors = _adapter_tensors(str(adapter_dir))
        suffix = ".sparse_delta_values" if self.kind == "SPARSE_DELTA" else ".lora_A.weight"
        self.modules = sorted(k[: -len(suffix)].removeprefix("base_model.model.") for k in self.tensors
                              if k.endswith(suffix))
        if not self.modules:
            raise ValueError(f"{adapter_dir}: the adapter file holds no {self.kind} weights")

    def __len__(self) -> int:
        return len(self.modules)

    def _delta(self, module: str, shape) -> torch.Tensor:
        key = f"base_model.model.{module}"
        if self.kind == "SPARSE_DELTA":
            values = self.tensors[f"{key}.sparse_delta_values"].float()
            idx = decode_indices(self.tensors[f"{key}.sparse_delta_index_stream"], math.prod(shape), name=module)
            return torch.zeros(math.prod(shape)).index_put_((idx,), values).view(shape)
        a, b = self.tensors[f"{key}.lora_A.weight"].float(), self.tensors[f"{key}.lora_B.weight"].float()
        r = a.shape[0]
        alpha = (self.config.get("alpha_pattern") or {}).get(module.split(".")[-1], self.config.get("lora_alpha", r))
        scale = alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r
        delta = scale * (b @ a)
        return delta.T if self.config.get("fan_in_fan_out") else delta

    def names(self) -> list[str]:
        return [f"{module}.weight" for module in self.modules]

    def pair(self, name: str):
        """``(W_base, D)`` of one adapted weight, or ``None`` (recorded in ``skipped``) if it cannot be built."""
        if name not in self.base:
            self.skipped.append((name, "adapted module has no weight in the base checkpoint"))
            return None
        w = self.base.get(name).float()
        try:
            d = self._delta(name.removesuffix(".weight"), tuple(w.shape))
        except (ValueError, RuntimeError) as err:
            self.skipped.append((name, f"cannot build the delta: {err}"))
            return None
        if d.shape != w.shape:
            self.skipped.append((name, f"delta shape {tuple(d.shape)} != weight shape {tuple(w.shape)}"))
            return None
        return w, d

    def __iter__(self):
        for name in self.names():
            pair = self.pair(name)
            if pair is not None:
                yield name, *pair
            pair = None


def open_source(base, tuned) -> DeltaSource:
    """Pick the source for ``tuned``: a PEFT adapter directory, or a checkpoint / state dict."""
    if not isinstance(tuned, Mapping) and os.path.isfile(os.path.join(str(tuned), "adapter_config.json")):
        return AdapterDeltas(base, tuned)
    return CheckpointPair(base, tuned)
