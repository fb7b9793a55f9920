"""`SparseDeltaModel`: injects sparse-delta layers, resolves masks, and saves the compact adapter format."""

from __future__ import annotations

import dataclasses
import math

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers.pytorch_utils import Conv1D as HFConv1D

from ..distributed import is_sharded
from ..masks.budget import allocate_budget
from ..masks.priors import prior_indices
from ..masks.sparse_mask import SparseMask, normalize_module_name
from ..masks.targets import all_linear_modules, linear_modules, stored_shape, stored_weight
from .bnb import QuantizedLinear, is_bnb_layer
from .config import VALUE_DTYPES, SparseDeltaConfig
from .conv1d import Conv1D
from .fingerprint import check_fingerprint, compute_fingerprint, merge_probe
from .layer import Linear, SparseDeltaLayer
from .loading import adapter_digest, check_adapter_state


def _plain_weight(module: nn.Module) -> torch.Tensor | None:
    base = module.get_base_layer() if isinstance(module, SparseDeltaLayer) else module
    return None if is_bnb_layer(base) else base.weight


class SparseDeltaModel(BaseTuner):
    """Sparse-delta PEFT model; created by `get_peft_model(model, SparseDeltaConfig(...))`."""

    prefix: str = "sparse_delta_"
    tuner_layer_cls = SparseDeltaLayer
    target_module_mapping: dict = {}

    # configuration --------------------------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: SparseDeltaConfig, model_config: dict) -> SparseDeltaConfig:
        if peft_config.target_modules is None and peft_config.module_counts:
            peft_config.target_modules = set(peft_config.module_counts)
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        self._pending_indices = self._resolve_indices(model, config, adapter_name)
        try:
            super().inject_adapter(model, adapter_name, **kwargs)
        finally:
            pending, self._pending_indices = self._pending_indices, None
        if pending:
            missing = sorted(pending)
            raise ValueError(
                f"the mask names modules that were not adapted: {missing[:5]}{' ...' if len(missing) > 5 else ''}. "
                "They must be nn.Linear, transformers Conv1D or bitsandbytes linear layers matched by target_modules"
            )
        self._check_or_set_fingerprint(model, config, adapter_name)
        config.module_index_bytes = {
            name.removeprefix("base_model.model."): int(module.sparse_delta_index_stream[adapter_name].numel())
            for name, module in model.named_modules()
            if isinstance(module, SparseDeltaLayer) and adapter_name in module.sparse_delta_index_stream
        }

    def _resolve_indices(self, model: nn.Module, config: SparseDeltaConfig, adapter_name: str):
        """Module name -> int64 flat indices (or a count when loading: indices come from the adapter file)."""
        candidates = all_linear_modules(model)
        if config.mask is not None:
            mask = config.mask
            if isinstance(mask, dict):
                shapes = {normalize_module_name(n): stored_shape(candidates[normalize_module_name(n)])
                          for n in mask if normalize_module_name(n) in candidates}
                unknown = [n for n in mask if normalize_module_name(n) not in candidates]
                if unknown:
                    raise ValueError(self._unknown_modules_message(unknown, model))
                mask = SparseMask.from_dict(mask, shapes)
            unknown = [n for n in mask.modules() if n not in candidates]
            if unknown:
                raise ValueError(self._unknown_modules_message(unknown, model))
            for name in mask.modules():
                actual = stored_shape(candidates[name])
                if tuple(mask.shapes[name]) != tuple(actual):
                    raise ValueError(
                        f"{name}: the mask was made for a weight of shape {tuple(mask.shapes[name])} but the model's "
                        f"weight has shape {tuple(actual)}; build the mask from this model"
                    )
            resolved = dict(mask.indices)
        elif config.module_counts:
            if set(config.module_counts) != set(config.module_index_bytes or {}):
                raise ValueError(
                    "adapter_config.json lists module_counts without matching module_index_bytes; it was not written "
                    "by this version of sparse_opd or was edited by hand"
                )
            resolved = {name: (int(k), int(config.module_index_bytes[name]))
                        for name, k in config.module_counts.items()}
        elif config.mask_init is not None:
            targets = linear_modules(model, config.target_modules, config.exclude_modules)
            resolved = _initial_mask(targets, config)
            config.target_modules = set(resolved)
        else:
            raise ValueError("SparseDeltaConfig has neither a mask, mask_init nor module_counts")
        config.module_counts = {n: int(v[0]) if isinstance(v, tuple) else int(v.numel()) for n, v in resolved.items()}
        config.module_shapes = {n: list(stored_shape(candidates[n])) for n in resolved if n in candidates}
        if config.mask is None and config.mask_init is not None and all(torch.is_tensor(v) for v in resolved.values()):
            # Keep the drawn mask on the config (same storage as the layers' buffers, not serialized) so that reusing
            # this config object adapts another model with the same coordinates.
            config.mask = SparseMask(resolved, {n: tuple(config.module_shapes[n]) for n in resolved})
        return resolved

    @staticmethod
    def _unknown_modules_message(unknown, model) -> str:
        names = list(all_linear_modules(model))[:5]
        return (
            f"the mask names {len(unknown)} module(s) that are not linear layers of this model: {unknown[:5]}. "
            f"Use module names as in model.named_modules(), e.g. {names}"
        )

    def _check_or_set_fingerprint(self, model, config, adapter_name):
        layers = {}
        for name, module in model.named_modules():
            if isinstance(module, SparseDeltaLayer) and adapter_name in module.sparse_delta_values:
                layers[name] = (module.weight_shape, _plain_weight(module))
        if config.base_model_fingerprint is None:
            config.base_model_fingerprint = compute_fingerprint(layers)
        else:
            check_fingerprint(config.base_model_fingerprint, layers, adapter_name)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's switch for adapter dtypes. ``value_dtype="auto"`` keeps the fp32 values on any base by default and
        takes the base weights' dtype with ``autocast_adapter_dtype=False``; an explicit ``value_dtype`` always wins."""
        config = self.peft_config[adapter_name]
        if autocast_adapter_dtype or config.value_dtype != "auto":
            return
        for module in self.model.modules():
            if isinstance(module, SparseDeltaLayer) and adapter_name in module.sparse_delta_values:
                module.cast_values(adapter_name, module.base_dtype())

    # module creation ------------------------------------------------------------------------------------------------
    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        pending = self._pending_indices
        if current_key not in pending:
            return  # matched by a target_modules pattern but not in the mask: leave it alone
        entry = pending.pop(current_key)
        placeholder = entry if isinstance(entry, tuple) else None
        indices = None if placeholder else entry
        if isinstance(target, SparseDeltaLayer):
            target.update_layer(adapter_name, indices, peft_config, module_name=current_key, placeholder=placeholder)
            return
        new_module = self._create_new_module(peft_config, adapter_name, target, indices, current_key, placeholder)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config, adapter_name, target, indices, module_name, placeholder=None):
        if is_bnb_layer(target):
            cls = QuantizedLinear
        elif isinstance(target, HFConv1D):
            cls = Conv1D
        elif isinstance(target, nn.Linear):
            cls = Linear
        else:
            raise TypeError(
                f"{module_name}: {type(target).__name__} is not supported by SparseDelta; supported layers are "
                "nn.Linear, transformers Conv1D and bitsandbytes Linear8bitLt / Linear4bit"
            )
        return cls(target, adapter_name, indices, config, module_name=module_name, placeholder=placeholder)

    # saving and loading ---------------------------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.save_dtype:
            dtype = VALUE_DTYPES[config.save_dtype]
            out = {k: v.to(dtype) if ".sparse_delta_values." in k else v for k, v in out.items()}
        if any(is_sharded(v) or v.numel() == 0 for k, v in out.items() if ".sparse_delta_values." in k):
            return out  # a shard of a sharded checkpoint (FSDP / ZeRO-3): not a file that loads as an adapter alone
        config.weights_digest = adapter_digest(out, adapter_name)  # adapter_config.json is written after the weights
        if config.base_model_fingerprint:
            layers = {normalize_module_name(n): m for n, m in model.named_modules()
                      if isinstance(m, SparseDeltaLayer) and adapter_name in m.sparse_delta_values}
            probe = merge_probe(layers, adapter_name, config.base_model_fingerprint.get("dtype"))
            config.base_model_fingerprint = {**config.base_model_fingerprint, "merge_probe": probe}
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_adapter_state(model, config, adapter_name, remapped)  # before PEFT copies anything
        return remapped

    # combining adapters ---------------------------------------------------------------------------------------------
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add ``adapter_name`` = sum_i weights[i] * delta_i, on the union of the adapters' coordinates.

        Sums of sparse deltas are exact (no SVD or rank truncation as for LoRA): a coordinate trained by several
        adapters gets the weighted sum of their values.
        """
        if len(adapters) != len(weights) or not adapters:
            raise ValueError("add_weighted_adapter needs one weight per adapter and at least one adapter")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"unknown adapters {missing}; known: {sorted(self.peft_config)}")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; pick a new name or delete it first")
        layers = {n: m for n, m in self.model.named_modules() if isinstance(m, SparseDeltaLayer)}
        union, shapes = {}, {}
        for name, layer in layers.items():
            parts = [layer.sparse_delta_indices[a].cpu() for a in adapters if a in layer.sparse_delta_indices]
            if parts:
                union[name] = torch.unique(torch.cat(parts))
                shapes[name] = layer.weight_shape
        base = self.peft_config[adapters[0]]
        config = dataclasses.replace(
            base, mask=SparseMask(union, shapes), mask_init=None, target_modules=None, module_counts=None,
            module_index_bytes=None, module_shapes=None, base_model_fingerprint=None, inference_mode=True,
        )
        self.peft_config[adapter_name] = config
        self.inject_adapter(self.model, adapter_name)
        with torch.no_grad():
            for name, indices in union.items():
                layer = layers[name]
                values = layer.sparse_delta_values[adapter_name]
                values.zero_()
                for adapter, weight in zip(adapters, weights):
                    if adapter in layer.sparse_delta_indices:
                        pos = torch.searchsorted(indices.to(values.device), layer.sparse_delta_indices[adapter])
                        values.index_add_(0, pos, weight * layer.sparse_delta_values[adapter].to(values.dtype))


def _initial_mask(modules: dict[str, nn.Module], config: SparseDeltaConfig) -> dict[str, torch.Tensor]:
    """mask_init: per module, the smallest-|W| or random coordinates under an FFN-weighted budget."""
    shapes = {name: stored_shape(module) for name, module in modules.items()}
    counts = allocate_budget(shapes, density=config.mask_density, block_weights=config.mask_block_weights)
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    weights = {name: stored_weight(module) for name, module in modules.items()}
    return prior_indices(config.mask_init, counts, numels, weights, seed=config.mask_seed)
