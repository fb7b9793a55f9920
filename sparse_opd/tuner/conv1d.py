"""Sparse delta on transformers' GPT-2-style ``Conv1D`` (weight stored ``(in, out)``, ``y = x @ W + b``)."""

from __future__ import annotations

from .layer import SparseDeltaModule


class Conv1D(SparseDeltaModule):
    transposed = True

    @property
    def weight_shape(self) -> tuple[int, int]:
        return tuple(self.get_base_layer().weight.shape)
