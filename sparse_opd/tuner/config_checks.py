"""What each field of a `SparseDeltaConfig` may hold, checked before anything uses it.

A config comes from Python, from command-line flags or from an `adapter_config.json` someone else wrote; a field of
the wrong type must be one `ValueError` naming the field, never an `AttributeError` or `OverflowError` deep inside
the tuner. Values are only checked here, never converted (except JSON's lists where a set or tuple is meant).
"""

from __future__ import annotations

import math
import numbers
import os
import re

import torch

# the dtypes a sparse delta's values may have, by the names used in configs
VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}
MASK_INITS = ("near_zero", "random")
_CHOICES = {
    "mask_init": (None, *MASK_INITS),
    "value_dtype": ("auto", *VALUE_DTYPES),
    "value_grad": ("auto", "dense", "sampled"),
    "compose": ("auto", "always", "never"),
    "save_dtype": (None, *VALUE_DTYPES),
    "index_encoding": ("auto", "gaps", "bitmap", "int32"),
}
_DIGEST = re.compile(r"[0-9a-f]{32}")


def _fail(name: str, expected: str, value) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ValueError(f"{name} in the config must be {expected}, got {shown}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _names(name: str, value, allow_str: bool) -> None:
    if value is None or (allow_str and isinstance(value, str)):
        return
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value):
        raise _fail(name, "a list of module names" + (" or a regex string" if allow_str else ""), value)


def _int_map(name: str, value, low: int) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _fail(name, "a dict of module name -> integer", value)
    bad = next((k for k, v in value.items() if not _is_int(v) or v < low), None)
    if bad is not None:
        raise _fail(f"{name}[{bad!r}]", f"an integer >= {low}", value[bad])


def check_field_types(config) -> None:
    """Raise a `ValueError` naming the first field of ``config`` that holds a value of the wrong type or range."""
    from ..masks.sparse_mask import SparseMask

    if config.mask is not None and not isinstance(config.mask, (str, os.PathLike, SparseMask, dict)):
        raise TypeError(
            f"mask must be a SparseMask, a path to a mask file or a dict of module name -> bool tensor / flat "
            f"indices, got {type(config.mask).__name__}"
        )
    _names("target_modules", config.target_modules, allow_str=True)
    _names("exclude_modules", config.exclude_modules, allow_str=True)
    _names("modules_to_save", config.modules_to_save, allow_str=False)
    for name, choices in _CHOICES.items():
        value = getattr(config, name)
        if not (value is None or isinstance(value, str)) or value not in choices:
            raise _fail(name, "one of " + ", ".join(repr(c) for c in choices), value)
    for name in ("mask_density", "sampled_grad_max_density"):
        if not _is_number(getattr(config, name)):
            raise _fail(name, "a finite number", getattr(config, name))
    if not _is_int(config.mask_seed):
        raise _fail("mask_seed", "an integer", config.mask_seed)
    if not isinstance(config.init_weights, bool):
        raise _fail("init_weights", "true or false", config.init_weights)
    if not _is_int(config.grad_block_elements) or config.grad_block_elements < 1:
        raise _fail("grad_block_elements", "an integer >= 1", config.grad_block_elements)
    _check_saved_fields(config)


def _check_saved_fields(config) -> None:
    """The fields the tuner fills in for a saved adapter: present together, consistent, of the right types."""
    _int_map("module_counts", config.module_counts, low=1)
    _int_map("module_index_bytes", config.module_index_bytes, low=2)
    counts = config.module_counts
    others = {"module_index_bytes": config.module_index_bytes, "module_shapes": config.module_shapes,
              "weights_digest": config.weights_digest}
    if counts is None:
        given = [name for name, value in others.items() if value is not None]
        if given:
            raise ValueError(f"the config has {given[0]} but no module_counts: adapter_config.json is incomplete or "
                             "was edited by hand")
        return
    if not counts:
        raise _fail("module_counts", "a non-empty dict of module name -> count", counts)
    if config.module_index_bytes is None or set(config.module_index_bytes) != set(counts):
        raise ValueError("module_index_bytes must name the same modules as module_counts: adapter_config.json was "
                         "not written by this version of sparse_opd or was edited by hand")
    shapes = config.module_shapes
    if shapes is not None:
        if not isinstance(shapes, dict) or set(shapes) - set(counts):
            raise _fail("module_shapes", "a dict over the modules of module_counts", shapes)
        bad = next((k for k, v in shapes.items() if not isinstance(v, (list, tuple)) or len(v) != 2
                    or not all(_is_int(d) and d > 0 for d in v)), None)
        if bad is not None:
            raise _fail(f"module_shapes[{bad!r}]", "[rows, columns] of positive integers", shapes[bad])
    if config.weights_digest is not None and not (isinstance(config.weights_digest, str)
                                                  and _DIGEST.fullmatch(config.weights_digest)):
        raise _fail("weights_digest", "32 lowercase hex digits", config.weights_digest)
    if config.base_model_fingerprint is not None:
        from .fingerprint import check_fingerprint_format

        check_fingerprint_format(config.base_model_fingerprint)
