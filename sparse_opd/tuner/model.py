"""`SparseDeltaModel`: injects sparse-delta layers on the coordinates a config names, and saves and loads them."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers.pytorch_utils import Conv1D as HFConv1D

from ..masks.sparse_mask import SparseMask, normalize_module_name
from .bnb import QuantizedLinear, is_bnb_layer
from .config import VALUE_DTYPES, SparseDeltaConfig
from .conv1d import Conv1D
from .coordinates import resolve_coordinates
from .fingerprint import check_fingerprint, compute_fingerprint
from .layer import Linear, SparseDeltaLayer
from .loading import PendingLoad, check_adapter_state, check_not_merged


def _plain_weight(module: nn.Module) -> torch.Tensor | None:
    base = module.get_base_layer() if isinstance(module, SparseDeltaLayer) else module
    return None if is_bnb_layer(base) else base.weight


def _adapter_layers(model: nn.Module, adapter_name: str) -> dict[str, SparseDeltaLayer]:
    return {normalize_module_name(n): m for n, m in model.named_modules()
            if isinstance(m, SparseDeltaLayer) and adapter_name in m.sparse_delta_values}


class SparseDeltaModel(BaseTuner):
    """Trainable values on fixed coordinates of a model's frozen weights (the SparseDelta PEFT method); PEFT creates it
    from a [`SparseDeltaConfig`] in `get_peft_model` and `PeftModel.from_pretrained`.

    Each targeted `nn.Linear`, GPT-2 `Conv1D` or bitsandbytes 8-/4-bit linear becomes a [`SparseDeltaLayer`] that
    computes `base(x) + x @ delta^T`, `delta` holding the values at the adapter's coordinates. Merging, unmerging
    (bit-exact), several adapters, `add_weighted_adapter` and `merge_and_unload` work as in PEFT's other methods.

    Args:
        model ([`~transformers.PreTrainedModel`]): the model to adapt; its targeted weights stay frozen.
        peft_config ([`SparseDeltaConfig`] or `dict[str, SparseDeltaConfig]`): the adapter's configuration.
        adapter_name (`str`): the adapter's name (`"default"` from `get_peft_model`).
        low_cpu_mem_usage (`bool`, defaults to `False`): create the values on the meta device (loading fills them).
        state_dict (`dict[str, torch.Tensor]`, *optional*): passed on to PEFT's `BaseTuner` (PEFT's own use).

    Example:

    ```python
    >>> import sparse_opd  # registers SPARSE_DELTA with PEFT
    >>> from peft import get_peft_model
    >>> from transformers import AutoModelForCausalLM
    >>> from sparse_opd import SparseDeltaConfig

    >>> base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> model = get_peft_model(base, SparseDeltaConfig(mask_density=0.01))  # model.base_model: a SparseDeltaModel
    >>> model.print_trainable_parameters()  # the values: 1% of the adapted entries
    >>> merged = model.merge_and_unload()  # a plain transformers model with W + delta
    ```
    """

    prefix: str = "sparse_delta_"
    tuner_layer_cls = SparseDeltaLayer
    target_module_mapping: ClassVar[dict] = {}

    # configuration --------------------------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: SparseDeltaConfig, model_config: dict) -> SparseDeltaConfig:
        if peft_config.target_modules is None and peft_config.module_counts:
            peft_config.target_modules = set(peft_config.module_counts)
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        resolve_coordinates(model, config)  # config.mask, or a saved adapter's counts (placeholders)
        super().inject_adapter(model, adapter_name, **kwargs)
        layers = _adapter_layers(model, adapter_name)
        missing = sorted(set(config.module_counts) - set(layers))
        if missing:
            raise ValueError(
                f"the mask names modules that were not adapted: {missing[:5]}{' ...' if len(missing) > 5 else ''}. "
                "They must be nn.Linear, transformers Conv1D or bitsandbytes linear layers matched by target_modules"
            )
        self._check_or_set_fingerprint(layers, config, adapter_name)
        config.module_index_bytes = {name: int(layer.sparse_delta_index_stream[adapter_name].numel())
                                     for name, layer in layers.items()}
        if config.mask is None:  # built from a saved config: the adapter file fills the layers in
            PendingLoad(model, config, adapter_name)

    def _check_or_set_fingerprint(self, layers: dict[str, SparseDeltaLayer], config, adapter_name):
        found = {name: (layer.weight_shape, _plain_weight(layer)) for name, layer in layers.items()}
        if config.base_model_fingerprint is None:
            config.base_model_fingerprint = compute_fingerprint(found)
        else:
            check_fingerprint(config.base_model_fingerprint, found, adapter_name)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's switch for adapter dtypes, also called after loading. ``value_dtype="auto"`` keeps fp32 values on any
        base by default and takes the base weights' dtype with ``autocast_adapter_dtype=False``; an explicit
        ``value_dtype`` always wins. Values loaded in the file's own dtype (``low_cpu_mem_usage=True``) are cast
        too."""
        config = self.peft_config[adapter_name]
        for layer in _adapter_layers(self.model, adapter_name).values():
            if config.value_dtype != "auto":
                dtype = VALUE_DTYPES[config.value_dtype]
            else:
                dtype = torch.float32 if autocast_adapter_dtype else layer.base_dtype()
            if layer.sparse_delta_values[adapter_name].device.type != "meta":
                layer.cast_values(adapter_name, dtype)

    # module creation ------------------------------------------------------------------------------------------------
    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        name = normalize_module_name(current_key)
        mask = peft_config.mask
        if isinstance(mask, SparseMask):
            if name not in mask.indices:
                return  # matched by a target_modules pattern but not in the mask: leave it alone
            indices, placeholder = mask.indices[name], None
        elif peft_config.module_counts and name in peft_config.module_counts:
            indices = None
            placeholder = (int(peft_config.module_counts[name]), int(peft_config.module_index_bytes[name]))
        else:
            return
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
        for layer in _adapter_layers(model, adapter_name).values():
            layer._check_loaded([adapter_name])  # never export placeholders or a file that failed its checks
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if config.save_dtype:
            dtype = VALUE_DTYPES[config.save_dtype]
            out = {k: v.to(dtype) if ".sparse_delta_values." in k else v for k, v in out.items()}
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        pending = PendingLoad.of(model, adapter_name)
        check_not_merged(model, adapter_name)
        check_adapter_state(model, config, adapter_name, remapped, from_saved_config=pending is not None)
        if pending is not None:  # the whole file was checked before PEFT copies any of it
            pending.mark_checked()
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
        if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
            raise ValueError(f"add_weighted_adapter needs finite numbers as weights, got {list(weights)}")
        layers = {n: m for n, m in self.model.named_modules() if isinstance(m, SparseDeltaLayer)}
        for layer in layers.values():
            layer._check_loaded([a for a in adapters if a in layer.sparse_delta_values])
        union, shapes = {}, {}
        for name, layer in layers.items():
            parts = [layer.sparse_delta_indices[a].cpu() for a in adapters if a in layer.sparse_delta_indices]
            if parts:
                union[name] = torch.unique(torch.cat(parts))
                shapes[name] = layer.weight_shape
        base = self.peft_config[adapters[0]]
        config = dataclasses.replace(
            base, mask=SparseMask(union, shapes), mask_init=None, target_modules=None, module_counts=None,
            module_index_bytes=None, module_shapes=None, base_model_fingerprint=None, weights_digest=None,
            inference_mode=True,
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

