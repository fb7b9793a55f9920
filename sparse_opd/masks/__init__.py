"""Masks: which coordinates a sparse delta may train."""

from .encoding import decode_indices, encode_indices
from .sparse_mask import SparseMask, normalize_module_name

__all__ = ["SparseMask", "decode_indices", "encode_indices", "normalize_module_name"]
