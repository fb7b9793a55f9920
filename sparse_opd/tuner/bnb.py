"""Sparse delta on bitsandbytes ``Linear8bitLt`` / ``Linear4bit``: base output + delta, no dequantized copy kept."""

from __future__ import annotations

from .layer import SparseDeltaModule


def bnb_layer_types() -> tuple[type, ...]:
    try:
        import bitsandbytes as bnb
    except Exception:  # bitsandbytes missing or unusable on this platform
        return ()
    return (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)


class QuantizedLinear(SparseDeltaModule):
    """The quantized weight is only used through the base layer's own forward; merging is refused."""

    quantized = True
