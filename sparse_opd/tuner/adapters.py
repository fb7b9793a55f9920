"""Reading a model's sparse-delta adapters: its layers, and an adapter's coordinates as a `SparseMask`."""

from __future__ import annotations

from torch import nn

from ..masks.sparse_mask import SparseMask
from .layer import SparseDeltaLayer


def sparse_delta_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, SparseDeltaLayer]:
    """Module name -> sparse-delta layer holding `adapter_name` (any adapter when `None`)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, SparseDeltaLayer)
        and (adapter_name is None or adapter_name in module.sparse_delta_values)
    }


def adapter_mask(model: nn.Module, adapter_name: str = "default") -> SparseMask:
    """The coordinates of a sparse-delta adapter in a (Peft)model, as a `SparseMask` named like the plain model."""
    indices, shapes = {}, {}
    for name, module in sparse_delta_layers(model, adapter_name).items():
        module._check_loaded([adapter_name])  # a placeholder's coordinates are not the adapter's
        indices[name] = module.sparse_delta_indices[adapter_name].cpu()
        shapes[name] = module.weight_shape
    if not indices:
        raise ValueError(f"the model has no sparse-delta adapter named {adapter_name!r}")
    return SparseMask(indices, shapes)
