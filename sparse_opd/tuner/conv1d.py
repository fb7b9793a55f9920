"""Sparse delta on transformers' GPT-2-style ``Conv1D`` (weight stored ``(in, out)``, ``y = x @ W + b``)."""

from __future__ import annotations

from .layer import SparseDeltaModule


class Conv1D(SparseDeltaModule):
    transposed = True
