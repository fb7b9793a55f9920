"""Fast generation with a sparse delta: merge it into the base weights for the duration, restore them exactly after.

Unmerged, every sparse-delta layer composes `W + delta` (or adds `x @ delta^T`) on every forward, which during
token-by-token generation costs as much as the model itself. The tuner's merge adds the delta once (rounding once to
the base dtype, like `compose_merged_weight`) and its unmerge restores the saved original entries bit for bit, so
merging around `generate` changes speed, not results or the base weights.
"""

from __future__ import annotations

import contextlib
import math

from torch import nn

from ..tuner import SparseDeltaLayer


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
