"""Masks: which coordinates a sparse delta may train."""

from .budget import allocate_budget
from .diff import DiffReport
from .encoding import decode_indices, encode_indices
from .module_types import block_of, layer_index, module_type
from .overlap import Overlap, intersection, mask_overlap, union
from .priors import near_zero_mask, prior_indices, prior_mask, random_mask
from .sparse_mask import SparseMask, normalize_module_name
from .top_k import top_k_indices, top_k_mask

__all__ = [
    "DiffReport",
    "Overlap",
    "SparseMask",
    "allocate_budget",
    "block_of",
    "decode_indices",
    "encode_indices",
    "intersection",
    "layer_index",
    "mask_overlap",
    "module_type",
    "near_zero_mask",
    "normalize_module_name",
    "prior_indices",
    "prior_mask",
    "random_mask",
    "top_k_indices",
    "top_k_mask",
    "union",
]
