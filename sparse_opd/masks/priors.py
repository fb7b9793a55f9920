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


def prior_indices(how: str, counts: Mapping[str, int], numels: Mapping[str, int],
                  weights: Mapping[str, torch.Tensor] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per module, ``counts[name]`` flat coordinates out of ``numels[name]``: those of the smallest ``|W|``
    (``how="near_zero"``, needs ``weights``) or uniformly random ones (``how="random"``, reproducible with ``seed``;
    one generator is drawn from module by module, in the order of ``counts``)."""
    if how not in ("near_zero", "random"):
        raise ValueError(f"how must be 'near_zero' or 'random', got {how!r}")
    gen = torch.Generator().manual_seed(seed)
    indices = {}
    for name, count in counts.items():
        if how == "random":
            indices[name] = torch.randperm(numels[name], generator=gen)[:count]
        else:
            magnitude = weights[name].detach().float().abs().reshape(-1)
            indices[name] = torch.topk(magnitude, count, largest=False, sorted=False).indices.cpu()
    return indices


def _prior_mask(how, model, density, total, block_weights, target_modules, seed=0) -> SparseMask:
    weights = _target_weights(model, target_modules)
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    counts = allocate_budget(shapes, density, total, block_weights)
    numels = {n: w.numel() for n, w in weights.items()}
    return SparseMask(prior_indices(how, counts, numels, weights, seed), shapes)


def near_zero_mask(
    model: nn.Module,
    density: float | None = None,
    total: int | None = None,
    block_weights: str | Mapping[str, float] | None = "ffn",
    target_modules=None,
) -> SparseMask:
    """Per module, the coordinates with the smallest |W| (OPD's updates favour near-zero source weights)."""
    return _prior_mask("near_zero", model, density, total, block_weights, target_modules)


def random_mask(
    model: nn.Module,
    density: float | None = None,
    total: int | None = None,
    block_weights: str | Mapping[str, float] | None = "ffn",
    target_modules=None,
    seed: int = 0,
) -> SparseMask:
    """Per module, a uniformly random set of coordinates of the budgeted size (reproducible with ``seed``)."""
    return _prior_mask("random", model, density, total, block_weights, target_modules, seed)
