"""The SparseDelta PEFT method: trainable values on fixed coordinates of frozen weights."""

from .registration import add_peft_type, register

add_peft_type()

from .adapters import adapter_mask, sparse_delta_layers  # noqa: E402
from .config import SparseDeltaConfig  # noqa: E402
from .layer import Linear, SparseDeltaLayer  # noqa: E402
from .merging import compose_merged_weight, iter_merged_named_weights, merged_sparse_delta  # noqa: E402
from .model import SparseDeltaModel  # noqa: E402

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
