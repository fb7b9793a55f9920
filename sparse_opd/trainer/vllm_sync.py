"""Merged weights for a generation engine (vLLM), composed out of place: `W_sent = cast(W + delta)`.

TRL syncs a PEFT student into vLLM by merging the adapter in place, reading the weights and unmerging. For a sparse
delta on a bf16 base that round trip is a trap: `bf16(bf16(W + d) - d)` is not `W` in general, so the base would
drift a little every sync. Here each adapted weight is copied once, the k trained entries are added in fp32 and
rounded once, and the copy is sent; the base weights are never written. Only one module's copy exists at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..tuner import SparseDeltaLayer


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


def install_vllm_sync(vllm_generation, model: nn.Module) -> None:
    """Make TRL's `VLLMGeneration` send out-of-place merged weights instead of merging and unmerging in place.

    FSDP students keep TRL's own path (it walks FSDP's sharded tree); the tuner's unmerge is bit-exact there because
    it restores the saved original entries.
    """
    if vllm_generation._dist.is_fsdp:
        return

    def _iter_named_params():
        yield from iter_merged_named_weights(
            model,
            gather=lambda params: vllm_generation._dist.gather_params(params),
            rename=vllm_generation._fix_param_name_to_vllm,
        )

    vllm_generation._iter_named_params = _iter_named_params
