"""When an entry of a weight counts as changed: the one rule the diff mask, the analyzer and the overlap share.

For a base weight ``W`` and a delta ``D`` (``tuned - base``), an entry changed when ``|D| > threshold`` as stored
(``precision="raw"``; the paper's threshold is 1e-5), or when ``|bf16(W + D) - bf16(W)| > threshold``
(``precision="bf16"``: what two bfloat16 checkpoints of the same run can show). ``threshold=0`` means any change at
all. Arithmetic is in float32 (or the inputs' wider dtype): the difference of two nearby float32 numbers is exact.
"""

from __future__ import annotations

import torch

PRECISIONS = ("raw", "bf16")


def working_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def delta_of(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """``tuned - base`` in the working dtype (a new tensor)."""
    dtype = working_dtype(base, tuned)
    return tuned.to(dtype) - base.to(dtype)


def bf16_visible(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``bf16(W + D) - bf16(W)``: the delta a bfloat16 checkpoint can show."""
    dtype = working_dtype(base, delta)
    w = base.to(dtype)
    return (w + delta.to(dtype)).to(torch.bfloat16).to(dtype) - w.to(torch.bfloat16).to(dtype)


def changed_entries(base: torch.Tensor, delta: torch.Tensor, threshold: float = 1e-5,
                    precision: str = "raw") -> torch.Tensor:
    """Boolean map of the changed entries (see the module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if base.shape != delta.shape:
        raise ValueError(f"base and delta shapes differ: {tuple(base.shape)} and {tuple(delta.shape)}")
    if precision == "bf16":
        return bf16_visible(base, delta).abs() > threshold
    return delta.to(working_dtype(base, delta)).abs() > threshold
