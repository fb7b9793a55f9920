"""Masks that need no training signal: smallest-|W| ("near-zero") and random, under a budget."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..distributed import gathered
from .budget import allocate_budget
from .sparse_mask import SparseMask
from .targets import linear_modules, stored_shape, stored_weight


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
            continue
        weight = weights[name]
        if not weight.is_floating_point() or weight.element_size() == 1:
            raise ValueError(
                f"{name}: the near-zero prior needs plain weights but the layer is quantized; build the mask on the "
                "unquantized model (sparse_opd.masks.near_zero_mask) and pass it as mask=..."
            )
        with gathered([weight]) as (full,):  # ZeRO-3 / FSDP2: every rank reads the whole weight
            magnitude = full.detach().float().abs().reshape(-1)
            indices[name] = torch.topk(magnitude, count, largest=False, sorted=False).indices.cpu()
    return indices


def prior_mask(how: str, modules: Mapping[str, nn.Module], density: float | None = None, total: int | None = None,
               block_weights: str | Mapping[str, float] | None = "ffn", seed: int = 0) -> SparseMask:
    """The prior mask over ``modules`` (name -> linear layer): the budget split by `allocate_budget`, each module's
    count drawn by `prior_indices`. The one definition behind `near_zero_mask`, `random_mask` and the tuner's
    ``mask_init``."""
    shapes = {name: stored_shape(module) for name, module in modules.items()}
    counts = allocate_budget(shapes, density, total, block_weights)
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    weights = {name: stored_weight(module) for name, module in modules.items()} if how == "near_zero" else None
    return SparseMask(prior_indices(how, counts, numels, weights, seed), shapes)


def near_zero_mask(
    model: nn.Module,
    density: float | None = None,
    total: int | None = None,
    block_weights: str | Mapping[str, float] | None = "ffn",
    target_modules=None,
) -> SparseMask:
    """Per module, the coordinates with the smallest |W| (OPD's updates favour near-zero source weights)."""
    return prior_mask("near_zero", linear_modules(model, target_modules), density, total, block_weights)


def random_mask(
    model: nn.Module,
    density: float | None = None,
    total: int | None = None,
    block_weights: str | Mapping[str, float] | None = "ffn",
    target_modules=None,
    seed: int = 0,
) -> SparseMask:
    """Per module, a uniformly random set of coordinates of the budgeted size (reproducible with ``seed``)."""
    return prior_mask("random", linear_modules(model, target_modules), density, total, block_weights, seed)
