"""Which coordinates a new adapter trains, resolved when it is injected into a model.

A config names them as a `SparseMask`, a dict, a mask file, a prior to draw (`mask_init`), or, for a saved adapter,
only their counts (`module_counts`: the coordinates themselves are in its adapter file). `resolve_coordinates` turns
the first four into a `SparseMask` checked against the model and stores it in ``config.mask`` (so that reusing the
config adapts another model with the same coordinates), and fills in ``module_counts`` / ``module_shapes``.
"""

from __future__ import annotations

import math
import os

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..masks.priors import prior_mask
from ..masks.sparse_mask import SparseMask, normalize_module_name
from ..masks.targets import all_linear_modules, linear_modules, stored_shape


def resolve_coordinates(model: nn.Module, config) -> None:
    """Fill ``config.mask`` (a `SparseMask`) from a mask, mask file or prior, or keep a saved adapter's counts (its
    layers are then placeholders until the file is loaded); set ``module_counts`` and ``module_shapes``."""
    candidates = all_linear_modules(model)
    if config.mask is not None:
        mask = config.mask
        if isinstance(mask, str):
            mask = _load_mask_file(mask, candidates)
        elif isinstance(mask, dict):
            unknown = [n for n in mask if normalize_module_name(n) not in candidates]
            if unknown:
                raise ValueError(_unknown_modules_message(unknown, candidates))
            shapes = {normalize_module_name(n): stored_shape(candidates[normalize_module_name(n)]) for n in mask}
            mask = SparseMask.from_dict(mask, shapes)
        unknown = [n for n in mask.modules() if n not in candidates]
        if unknown:
            raise ValueError(_unknown_modules_message(unknown, candidates))
        for name in mask.modules():
            actual = stored_shape(candidates[name])
            if tuple(mask.shapes[name]) != tuple(actual):
                raise ValueError(
                    f"{name}: the mask was made for a weight of shape {tuple(mask.shapes[name])} but the model's "
                    f"weight has shape {tuple(actual)}; build the mask from this model"
                )
        if config.target_modules is None:
            config.target_modules = set(mask.modules())
    elif config.module_counts:
        unknown = [n for n in config.module_counts if n not in candidates]
        if unknown:
            raise ValueError(f"adapter_config.json adapts {len(unknown)} module(s) that are not linear layers of this "
                             f"model, e.g. {unknown[:3]}: the adapter belongs to another model")
        for name, shape in (config.module_shapes or {}).items():
            if tuple(shape) != tuple(stored_shape(candidates[name])):
                raise ValueError(f"{name}: adapter_config.json records a weight of shape {tuple(shape)} but the "
                                 f"model's is {tuple(stored_shape(candidates[name]))}: the adapter belongs to another "
                                 "model")
        mask = None
    elif config.mask_init is not None:
        targets = linear_modules(model, config.target_modules, config.exclude_modules)
        mask = prior_mask(config.mask_init, targets, density=config.mask_density,
                          block_weights=config.mask_block_weights, seed=config.mask_seed)
        config.target_modules = set(mask.modules())
    else:
        raise ValueError("SparseDeltaConfig has neither a mask, mask_init nor module_counts")
    names = mask.modules() if mask is not None else list(config.module_counts)
    check_untied(model, {name: candidates[name] for name in names})
    if mask is not None:
        config.mask = mask
        config.module_counts = {n: int(mask.indices[n].numel()) for n in names}
    config.module_shapes = {n: list(stored_shape(candidates[n])) for n in names}


def check_untied(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Refuse a module whose weight is the very tensor of another module (GPT-2's output head is its embedding): a
    delta on it would change both when merged, while the unmerged adapter changes only the head."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for name, module in modules.items():
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        weight = getattr(base, "weight", None)
        others = [n for n in owners.get(id(weight), []) if not n.startswith(name + ".")]
        if others:
            raise ValueError(
                f"{name}'s weight is tied to {others[0].removesuffix('.weight')} (one tensor): a sparse delta on it "
                f"would change that module too when merged. Leave {name} out of the mask and target_modules, or "
                "untie the weights first"
            )


def _load_mask_file(path: str, candidates: dict[str, nn.Module]):
    """A mask file named by a config: a regular file no larger than a dense mask of every linear layer could be."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file {path} does not exist or is not a regular file")
    limit = (1 << 20) + 5 * sum(math.prod(stored_shape(m)) for m in candidates.values())
    if os.path.getsize(path) > limit:
        raise ValueError(f"mask file {path} is {os.path.getsize(path) >> 20} MiB, more than a mask of every linear "
                         "layer of this model can take: not a mask file of this model")
    return SparseMask.load(path)


def _unknown_modules_message(unknown, candidates) -> str:
    return (
        f"the mask names {len(unknown)} module(s) that are not linear layers of this model: {unknown[:5]}. "
        f"Use module names as in model.named_modules(), e.g. {list(candidates)[:5]}"
    )

