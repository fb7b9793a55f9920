"""Sparse delta on bitsandbytes ``Linear8bitLt`` / ``Linear4bit``: base output + delta, no dequantized copy kept."""

from __future__ import annotations

import sys

import torch
from torch import nn

from .layer import SparseDeltaModule


def is_bnb_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 8-bit or 4-bit linear layer.

    Never imports bitsandbytes: a model cannot hold its layers unless something imported it already.
    """
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def _unpack_cpu_inference_layout(base: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference packing of a 4-bit weight.

    On CPUs with AVX512-BF16, a ``Linear4bit`` evaluated without gradients repacks its weight for a CPU kernel that
    has no backward: a later training forward would backpropagate through it silently wrong (bitsandbytes warns
    "an autograd kernel was not registered"). bitsandbytes undoes the packing the same way before saving.
    """
    state = getattr(base.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    base.weight.data, base.weight.quant_state = _convert_weight_packed_for_cpu_inverse(base.weight.data, state)


class QuantizedLinear(SparseDeltaModule):
    """The quantized weight is only used through the base layer's own forward; merging is refused.

    bitsandbytes' CPU inference packing (AVX512-BF16 CPUs) is switched off for the wrapped layer: it rounds the
    4-bit scales to bf16 and is not undone for training, so evaluation and training would see different base weights.
    A weight packed before wrapping is unpacked before the first forward that needs gradients.
    """

    quantized = True

    def __init__(self, base_layer: nn.Module, *args, **kwargs):
        super().__init__(base_layer, *args, **kwargs)
        if hasattr(base_layer, "support_avx512bf16_for_cpu"):
            base_layer.support_avx512bf16_for_cpu = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or any(
                self.sparse_delta_values[a].requires_grad for a in self._active())):
            _unpack_cpu_inference_layout(self.get_base_layer())
        return super().forward(x, *args, **kwargs)
