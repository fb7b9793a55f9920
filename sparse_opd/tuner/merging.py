"""Merged views of a sparse delta: weights composed out of place, and merging around generation.

`compose_merged_weight` builds ``cast(W + delta)`` as a new tensor (the base weights are never written): what a
generation engine such as vLLM is sent, or a merged export. `merged_sparse_delta` merges the active adapters in
place for the duration of a block and restores the base weights bit for bit after (the tuner's unmerge writes back
the saved original entries).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .layer import SparseDeltaLayer


@torch.no_grad()
def compose_merged_weight(module: SparseDeltaLayer, weight: torch.Tensor | None = None) -> torch.Tensor:
    """A new tensor `cast(W + delta)` over all active adapters of `module`, in the base weight's dtype and layout.

    The sum is formed in fp32 (fp64 for an fp64 base) at the trained coordinates only and rounded once to the
    weight's dtype; entries outside the mask are copied bit for bit.
    """
    if module.quantized:
        raise ValueError(
            "cannot compose merged weights of a quantized (bitsandbytes) base layer; dequantize the base model for "
            "generation engines that need plain weights"
        )
    weight = module.get_base_layer().weight if weight is None else weight
    merged = weight.detach().clone()
    if module.disable_adapters or module.merged:
        return merged  # disabled: the base; merged: the base layer already holds W + delta
    flat = merged.view(-1)
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    for adapter in module.active_adapters:
        if adapter not in module.sparse_delta_values:
            continue
        indices = module.sparse_delta_indices[adapter].to(flat.device)
        values = module.sparse_delta_values[adapter].detach().to(flat.device, acc_dtype)
        flat[indices] = (flat[indices].to(acc_dtype) + values).to(weight.dtype)
    return merged


def iter_merged_named_weights(
    model: nn.Module,
    gather: Callable[[list[torch.Tensor]], contextlib.AbstractContextManager] | None = None,
    rename: Callable[[str], str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` of a sparse-delta `PeftModel` as a plain model with the delta merged, one tensor at a time.

    Names drop PEFT's `base_model.model.` prefix and `.base_layer`; the sparse-delta values themselves are not
    yielded. `gather(params)` is entered around each read (ZeRO-3 / FSDP gathering; a no-op by default) and
    `rename` maps a plain name to the engine's (e.g. TRL's `_fix_param_name_to_vllm`).
    """
    gather = gather or (lambda params: contextlib.nullcontext())
    owners: dict[str, SparseDeltaLayer] = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseDeltaLayer):
            owners[f"{name}.base_layer.weight"] = module
    for name, param in model.named_parameters():
        if "sparse_delta_" in name:
            continue
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        plain = rename(plain) if rename is not None else plain
        owner = owners.get(name)
        extra = [owner.sparse_delta_values[a] for a in owner.sparse_delta_values] if owner is not None else []
        with gather([param, *extra]):
            yield plain, compose_merged_weight(owner, param) if owner is not None else param.data


def _mergeable(layer: SparseDeltaLayer) -> bool:
    if layer.merged or layer.disable_adapters or layer.quantized or not layer._active():
        return False
    weight = layer.get_base_layer().weight
    # sharded (ZeRO-3 / FSDP) or meta weights cannot be merged in place
    return weight.device.type != "meta" and weight.numel() == math.prod(layer.weight_shape)


@contextlib.contextmanager
def merged_sparse_delta(model: nn.Module):
    """Merge the active sparse-delta adapters of `model` in place while the block runs; unmerge them on exit."""
    merged = [m for m in model.modules() if isinstance(m, SparseDeltaLayer) and _mergeable(m)]
    done = []
    try:
        for layer in merged:
            layer.merge()
            done.append(layer)
        yield model
    finally:
        for layer in done:
            layer.unmerge()
