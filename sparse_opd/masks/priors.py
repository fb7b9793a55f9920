"""Masks that need no training signal: smallest-|W| ("near-zero") and random, under a budget."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .budget import allocate_budget
from .sparse_mask import SparseMask


def _target_weights(model: nn.Module, target_modules) -> dict[str, torch.Tensor]:
    from transformers.pytorch_utils import Conv1D

    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and (
            target_modules is None or name in target_modules or name.split(".")[-1] in target_modules
        ):
            if target_modules is None and name.split(".")[-1] in ("lm_head", "embed_out", "score"):
                continue
            weights[name] = module.weight
    if not weights:
        raise ValueError(f"no nn.Linear / Conv1D module matches target_modules={target_modules}")
    return weights


def _smallest_k(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(values.reshape(-1), k, largest=False, sorted=False).indices


def near_zero_mask(
    model: nn.Module,
    density: float | None = None,
    total: int | None = None,
    block_weights: str | Mapping[str, float] | None = "ffn",
    target_modules=None,
) -> SparseMask:
    """Per module, the coordinates with the smallest |W| (OPD's updates favour near-zero source weights)."""
    weights = _target_weights(model, target_modules)
    counts = allocate_budget({n: tuple(w.shape) for n, w in weights.items()}, density, total, block_weights)
    indices = {}
    for name, weight in weights.items():
        indices[name] = _smallest_k(weight.detach().float().abs(), counts[name]).cpu()
    return SparseMask(indices, {n: tuple(w.shape) for n, w in weights.items()})


def random_mask(
    model: nn.Module,
    density: float | None = None,
    total: int | None = None,
    block_weights: str | Mapping[str, float] | None = "ffn",
    target_modules=None,
    seed: int = 0,
) -> SparseMask:
    """Per module, a uniformly random set of coordinates of the budgeted size (reproducible with ``seed``)."""
    weights = _target_weights(model, target_modules)
    counts = allocate_budget({n: tuple(w.shape) for n, w in weights.items()}, density, total, block_weights)
    gen = torch.Generator().manual_seed(seed)
    indices = {}
    for name, weight in weights.items():
        indices[name] = torch.randperm(weight.numel(), generator=gen)[: counts[name]]
    return SparseMask(indices, {n: tuple(w.shape) for n, w in weights.items()})
