"""Merged views of a sparse delta: weights composed out of place, and merging around generation.

`compose_merged_weight` builds ``W + delta`` (rounded once to the base dtype) as a new tensor, never writing the
base: what a generation engine such as vLLM is sent, or a merged export. `merged_sparse_delta` merges in place for
the duration of a block, but only the layers where merging is exact: an fp32/fp64 weight merged holds the same bits
as the training forward's transient ``W + delta``, so generating from it samples the trained policy, and the tuner's
unmerge restores the base bit for bit. A bf16/fp16 weight cannot hold a small delta (``bf16(W + delta)`` drops what
is below half its rounding step, while the training forward adds ``x @ delta^T`` to the base output), so those layers
stay unmerged and generate through the sparse path of the layer's forward, which costs O(k) per token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..distributed import gathered, is_sharded
from .functional import merged_entries
from .layer import SparseDeltaLayer

EXACT_MERGE_DTYPES = (torch.float32, torch.float64)


@torch.no_grad()
def compose_merged_weight(module: SparseDeltaLayer, weight: torch.Tensor | None = None) -> torch.Tensor:
    """A new tensor ``W + delta`` over all active adapters of `module`, in the base weight's dtype and layout.

    The trained entries are added as the tuner's merge adds them (`merged_entries`: one rounding to the weight's
    dtype); entries outside the mask are copied bit for bit. ``weight`` defaults to the base layer's (pass a gathered
    full tensor for a sharded one).
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
    adapters = module._active()
    module._check_loaded(adapters)
    flat = merged.view(-1)
    for adapter in adapters:
        indices = module.sparse_delta_indices[adapter].to(flat.device)
        # Gather the parameter itself: a detached ZeRO-3 parameter is a plain tensor holding this rank's (usually
        # empty) partition, which `gathered` cannot recognise.
        with gathered([module.sparse_delta_values[adapter]]) as (values,):
            flat[indices] = merged_entries(flat[indices], values.detach().to(flat.device))
    return merged


def iter_merged_named_weights(
    model: nn.Module,
    gather: Callable[[list[torch.Tensor]], contextlib.AbstractContextManager] | None = None,
    rename: Callable[[str], str] | None = None,
    only: set[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` of a sparse-delta `PeftModel` as a plain model with the delta merged, one tensor at a time.

    Names drop PEFT's `base_model.model.` prefix and `.base_layer`; the sparse-delta values themselves are not
    yielded. Sharded parameters (ZeRO-3, FSDP2) are gathered one at a time (`sparse_opd.distributed.gathered`, or
    ``gather(params)`` if given, entered around each read: a collective, so every rank must iterate); `rename` maps a
    plain name to the engine's (e.g. TRL's `_fix_param_name_to_vllm`); ``only`` restricts the walk to these parameter
    names (as in ``model.named_parameters()``).
    """
    owners: dict[str, SparseDeltaLayer] = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseDeltaLayer):
            owners[f"{name}.base_layer.weight"] = module
    for name, param in model.named_parameters():
        if "sparse_delta_" in name or (only is not None and name not in only):
            continue
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        plain = rename(plain) if rename is not None else plain
        owner = owners.get(name)
        if gather is not None:
            with gather([param]):
                yield plain, compose_merged_weight(owner, param) if owner is not None else param.data
            continue
        with gathered([param]) as (full,):
            yield plain, compose_merged_weight(owner, full) if owner is not None else full.detach()


def _exactly_mergeable(layer: SparseDeltaLayer) -> bool:
    if layer.merged or layer.disable_adapters or layer.quantized or not layer._active():
        return False
    weight = layer.get_base_layer().weight
    values = [layer.sparse_delta_values[a] for a in layer._active()]
    return (weight.dtype in EXACT_MERGE_DTYPES and weight.device.type != "meta" and not is_sharded(weight)
            and not any(is_sharded(v) for v in values))


@contextlib.contextmanager
def merged_sparse_delta(model: nn.Module):
    """While the block runs, merge the active adapters of every layer where merging is exact (see the module
    docstring); unmerge them on exit, restoring the base weights bit for bit."""
    merged = [m for m in model.modules() if isinstance(m, SparseDeltaLayer) and _exactly_mergeable(m)]
    done = []
    try:
        for layer in merged:
            layer.merge()
            done.append(layer)
        yield model
    finally:
        for layer in done:
            layer.unmerge()
