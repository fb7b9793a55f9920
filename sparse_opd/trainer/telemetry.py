"""Weight-space telemetry of a sparse delta: how much of the mask moved, what a bf16 model would see, and norms.

All statistics read only the k trained values and the k base entries at their indices (gathered, never a dense
delta), so they cost O(k) per module.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from ..distributed import gathered, is_sharded, local_shard, sum_over_shards
from ..masks import block_of
from ..tuner import SparseDeltaLayer, sparse_delta_layers


def _base_entries(module: SparseDeltaLayer, adapter_name: str) -> torch.Tensor | None:
    """The base weight's entries at the adapter's indices (cached for a sharded weight: gathered once, frozen)."""
    base = module.get_base_layer()
    weight = getattr(base, "weight", None)
    if module.quantized or weight is None or weight.device.type == "meta":
        return None
    indices = module.sparse_delta_indices[adapter_name]
    if not is_sharded(weight):
        # the indices address the weight as stored, so a flat view of the stored tensor is the right frame
        return weight.detach().reshape(-1)[indices.to(weight.device)]
    cache = module.__dict__.setdefault("_telemetry_base_entries", {})
    if adapter_name not in cache or cache[adapter_name].numel() != indices.numel():
        with gathered([weight]) as (full,):
            cache[adapter_name] = full.detach().reshape(-1)[indices.to(full.device)].clone()
    return cache[adapter_name]


@torch.no_grad()
def sparse_delta_stats(model: nn.Module, adapter_name: str = "default", tau: float = 1e-5) -> dict[str, float]:
    """Statistics of one adapter's sparse delta.

    Returns a dict with:
        - `moved_frac`: fraction of the masked coordinates whose value is non-zero (the weight moved at all);
        - `moved_frac_tau`: fraction with `|value| > tau` (OPD papers count `|delta| <= 1e-5` as unchanged);
        - `bf16_visible_frac`: fraction where `bf16(W + delta) != bf16(W)`, i.e. the move survives a bf16 export of
          the merged weight (`nan` for quantized base layers, whose weights cannot be read as plain tensors);
        - `delta_norm_<block>`: L2 norm of the delta over the modules of each block (`ffn`, `attention`, `other`);
        - `delta_norm`: L2 norm of the whole delta; `num_values`: k.
    """
    layers = sparse_delta_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"the model has no sparse-delta layer with adapter {adapter_name!r}")
    total = moved = moved_tau = visible = visible_total = 0
    sq_norms = {"ffn": 0.0, "attention": 0.0, "other": 0.0}
    for name, module in layers.items():
        with gathered([module.sparse_delta_values[adapter_name]]) as (values,):
            values = values.detach().clone()
        total += values.numel()
        moved += int((values != 0).sum())
        moved_tau += int((values.abs() > tau).sum())
        sq_norms[block_of(name)] += float(values.double().pow(2).sum())
        base = _base_entries(module, adapter_name)
        if base is not None:
            values = values.to(base.device)
            before = base.to(torch.bfloat16)
            after = (base.float() + values.float()).to(torch.bfloat16)
            visible += int((after != before).sum())
            visible_total += values.numel()
    stats = {
        "moved_frac": moved / max(total, 1),
        "moved_frac_tau": moved_tau / max(total, 1),
        "bf16_visible_frac": visible / visible_total if visible_total else float("nan"),
        "delta_norm": sum(sq_norms.values()) ** 0.5,
        "num_values": float(total),
    }
    for block, sq in sq_norms.items():
        stats[f"delta_norm_{block}"] = sq**0.5
    return stats


class UpdateNormCallback(TrainerCallback):
    """Records the L2 norm of each optimizer step's change to the sparse values.

    Snapshots this rank's part of the values when a training step begins and measures the difference when it ends
    (DeepSpeed steps its optimizer inside the backward pass, so the optimizer-step events would see no change),
    summed over ranks when the values are sharded by ZeRO-3 or FSDP2; the norms collect in `norms` until the trainer
    reads and clears them at its next log.
    """

    def __init__(self, adapter_name: str = "default"):
        self.adapter_name = adapter_name
        self.norms: list[float] = []
        self._before: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _values(self, model: nn.Module) -> list[torch.Tensor]:
        return [
            m.sparse_delta_values[self.adapter_name] for m in sparse_delta_layers(model, self.adapter_name).values()
        ]

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._before = [(p, local_shard(p).detach().clone()) for p in self._values(model)]

    def on_step_end(self, args, state, control, **kwargs):
        if not self._before:
            return
        square = sum((local_shard(p).detach().double() - before.double()).pow(2).sum() for p, before in self._before)
        sharded = any(is_sharded(p) for p, _ in self._before)
        self.norms.append(float(sum_over_shards(torch.as_tensor(square, dtype=torch.float64), sharded)) ** 0.5)
        self._before = []
