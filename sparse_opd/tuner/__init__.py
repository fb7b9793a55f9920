"""The SparseDelta PEFT method: trainable values on fixed coordinates of frozen weights."""

from .registration import add_peft_type, register

add_peft_type()

from .adapters import adapter_mask, sparse_delta_layers
from .config import SparseDeltaConfig
from .layer import Linear, SparseDeltaLayer
from .merging import compose_merged_weight, iter_merged_named_weights, merged_sparse_delta
from .model import SparseDeltaModel

register(SparseDeltaConfig, SparseDeltaModel)

__all__ = [
    "Linear",
    "SparseDeltaConfig",
    "SparseDeltaLayer",
    "SparseDeltaModel",
    "adapter_mask",
    "compose_merged_weight",
    "iter_merged_named_weights",
    "merged_sparse_delta",
    "sparse_delta_layers",
]
