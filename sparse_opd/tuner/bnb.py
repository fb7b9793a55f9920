"""Sparse delta on bitsandbytes ``Linear8bitLt`` / ``Linear4bit``: base output + delta, no dequantized copy kept."""

from __future__ import annotations

import sys

from torch import nn

from .layer import SparseDeltaModule


def is_bnb_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 8-bit or 4-bit linear layer.

    Never imports bitsandbytes: a model cannot hold its layers unless something imported it already.
    """
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


class QuantizedLinear(SparseDeltaModule):
    """The quantized weight is only used through the base layer's own forward; merging is refused."""

    quantized = True
