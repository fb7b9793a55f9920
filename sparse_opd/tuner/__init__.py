"""The SparseDelta PEFT method: trainable values on fixed coordinates of frozen weights."""

from .registration import add_peft_type, register

add_peft_type()

from .adapters import adapter_mask, sparse_delta_layers
from .config import SparseDeltaConfig
from .layer import Linear, SparseDeltaLayer
from .merging import compose_merged_weight, iter_merged_named_weights, merged_sparse_delta
from .model import SparseDeltaModel
from .peft_model_hooks import install

register(SparseDeltaConfig, SparseDeltaModel)
install()  # save_pretrained / push_to_hub of sparse-delta models; every other model keeps PEFT's own

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
