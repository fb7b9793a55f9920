"""Masks: which coordinates a sparse delta may train."""

from .budget import allocate_budget
from .encoding import decode_indices, encode_indices
from .module_types import block_of, layer_index, module_type
from .priors import near_zero_mask, random_mask
from .sparse_mask import SparseMask, normalize_module_name

__all__ = [
    "SparseMask",
    "allocate_budget",
    "block_of",
    "decode_indices",
    "encode_indices",
    "layer_index",
    "module_type",
    "near_zero_mask",
    "normalize_module_name",
    "random_mask",
]
