"""`SparseDeltaConfig`: which coordinates of which weights train, and how."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..masks.sparse_mask import SparseMask

VALUE_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class SparseDeltaConfig(PeftConfig):
    """Configuration of a [`SparseDeltaModel`]: a trainable sparse delta on fixed coordinates of frozen weights.

    Parameters that choose the coordinates:
        mask (`SparseMask`, `dict` or `str`, *optional*):
            Module name -> coordinates. A `SparseMask`, a path to a mask file written by `SparseMask.save`, or a
            dict of module name -> boolean tensor of the weight's shape or 1-D flat indices into the weight as stored.
            Not written to `adapter_config.json`: the coordinates are saved with the adapter weights.
        target_modules (`list[str]` or `str`, *optional*):
            Defaults to the mask's modules, or to all linear layers but the output head when `mask_init` is used.
        mask_init (`"magnitude"` or `"random"`, *optional*):
            Build the mask at injection time, for users without one: the smallest-|W| coordinates (OPD's updates
            favour near-zero source weights) or random ones, `density` of each targeted weight, split by
            `block_weights`.
        density (`float`, *optional*): fraction of the targeted entries to train with `mask_init`.
        block_weights (`str` or `dict`): relative density per block, `"ffn"` (FFN-heavy), `"uniform"` or a dict.
        mask_seed (`int`): seed of `mask_init="random"`.

    Parameters that control training:
        init_weights (`bool`): `True` starts at a zero delta (the identity); `False` starts at small random values
            (for tests).
        value_dtype (`str`): dtype of the trainable values, `"float32"` by default on any base dtype: a bf16 weight
            cannot hold updates below half its rounding step.
        value_grad (`"auto"`, `"dense"` or `"sampled"`): how value gradients are computed. `"dense"` forms the
            weight gradient in row blocks of at most `grad_block_elements` entries and gathers it at the indices;
            `"sampled"` computes only the k needed dot products; `"auto"` picks `"sampled"` below
            `sampled_grad_max_density`.
        compose (`"auto"`, `"always"` or `"never"`): `"auto"` runs an fp32 plain layer as one matmul with a transient
            `W + delta` (as fast as the base layer); otherwise `base(x) + x @ delta^T`.

    Parameters that control saving:
        save_dtype (`str`, *optional*): dtype of the values in `adapter_model.safetensors` (default: `value_dtype`).
        index_encoding (`str`): `"auto"` (smallest per module), `"gaps"`, `"bitmap"` or `"int32"`.

    Filled in by the tuner (do not set by hand): `module_counts`, `module_index_bytes`, `module_shapes`,
    `base_model_fingerprint`.
    """

    mask: Optional[Any] = field(
        default=None,
        metadata={"help": "SparseMask, path to a mask file, or dict of module name -> bool tensor / flat indices."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules to adapt; defaults to the mask's modules (or all linear layers)."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Modules to leave out of `target_modules`."}
    )
    mask_init: Optional[Literal["magnitude", "random"]] = field(
        default=None, metadata={"help": "Build a mask without one: 'magnitude' (smallest |W|) or 'random'."}
    )
    density: Optional[float] = field(
        default=None, metadata={"help": "Fraction of targeted weight entries trained with mask_init."}
    )
    block_weights: Union[str, dict] = field(
        default="ffn", metadata={"help": "Relative density per block with mask_init: 'ffn', 'uniform' or a dict."}
    )
    mask_seed: int = field(default=0, metadata={"help": "Seed of mask_init='random'."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: start at a zero delta. False: small random values (tests)."}
    )
    value_dtype: str = field(default="float32", metadata={"help": "dtype of the trainable values."})
    value_grad: Literal["auto", "dense", "sampled"] = field(
        default="auto", metadata={"help": "Value-gradient method: 'auto', 'dense' (blockwise) or 'sampled'."}
    )
    sampled_grad_max_density: float = field(
        default=0.15, metadata={"help": "With value_grad='auto', use the sampled gradient below this density."}
    )
    grad_block_elements: int = field(
        default=1 << 24, metadata={"help": "Largest dense gradient block (entries) formed at once in backward."}
    )
    compose: Literal["auto", "always", "never"] = field(
        default="auto", metadata={"help": "Compose W + delta transiently for fp32 plain layers ('auto')."}
    )
    save_dtype: Optional[str] = field(default=None, metadata={"help": "dtype of saved values (default value_dtype)."})
    index_encoding: Literal["auto", "gaps", "bitmap", "int32"] = field(
        default="auto", metadata={"help": "Index encoding in the adapter file; 'auto' picks the smallest per module."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train fully and save (as in other PEFT methods)."}
    )
    module_counts: Optional[dict[str, int]] = field(
        default=None, metadata={"help": "Filled by the tuner: trained coordinates per module."}
    )
    module_index_bytes: Optional[dict[str, int]] = field(
        default=None, metadata={"help": "Filled by the tuner: size of each module's encoded index stream."}
    )
    module_shapes: Optional[dict[str, list[int]]] = field(
        default=None, metadata={"help": "Filled by the tuner: shape of each adapted weight as stored."}
    )
    base_model_fingerprint: Optional[dict[str, str]] = field(
        default=None, metadata={"help": "Filled by the tuner: digest of the base weights the adapter was made for."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SPARSE_DELTA
        if isinstance(self.mask, (str, os.PathLike)):
            self.mask = SparseMask.load(self.mask)
        elif self.mask is not None and not isinstance(self.mask, (SparseMask, dict)):
            raise TypeError(
                f"mask must be a SparseMask, a path to a mask file or a dict of module name -> bool tensor / flat "
                f"indices, got {type(self.mask).__name__}"
            )
        if isinstance(self.mask, dict) and not self.mask:
            raise ValueError("mask is empty: name at least one module and its coordinates")
        if self.mask is not None and self.mask_init is not None:
            raise ValueError("give either mask or mask_init, not both")
        if self.mask_init is not None:
            if self.mask_init not in ("magnitude", "random"):
                raise ValueError(f"mask_init must be 'magnitude' or 'random', got {self.mask_init!r}")
            if self.density is None or not 0 < self.density <= 1:
                raise ValueError(f"mask_init={self.mask_init!r} needs a density in (0, 1], got {self.density}")
        if self.mask is None and self.mask_init is None and not self.module_counts:
            raise ValueError(
                "SparseDeltaConfig needs coordinates: pass mask=... (SparseMask, mask file or dict) or "
                "mask_init='magnitude'|'random' with a density"
            )
        if self.mask is not None and self.target_modules is None:
            names = self.mask.modules() if isinstance(self.mask, SparseMask) else list(self.mask)
            from ..masks.sparse_mask import normalize_module_name

            self.target_modules = sorted(normalize_module_name(n) for n in names)
        for name in ("value_dtype", "save_dtype"):
            value = getattr(self, name)
            if value is not None and value not in VALUE_DTYPES:
                raise ValueError(f"{name} must be one of {VALUE_DTYPES}, got {value!r}")
        if self.value_grad not in ("auto", "dense", "sampled"):
            raise ValueError(f"value_grad must be 'auto', 'dense' or 'sampled', got {self.value_grad!r}")
        if self.compose not in ("auto", "always", "never"):
            raise ValueError(f"compose must be 'auto', 'always' or 'never', got {self.compose!r}")
        if self.index_encoding not in ("auto", "gaps", "bitmap", "int32"):
            raise ValueError(f"index_encoding must be 'auto', 'gaps', 'bitmap' or 'int32', got {self.index_encoding!r}")
        if self.grad_block_elements < 1:
            raise ValueError(f"grad_block_elements must be >= 1, got {self.grad_block_elements}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)

    def to_dict(self) -> dict:
        # The mask lives in adapter_model.safetensors (compactly encoded), not in JSON.
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "mask"}
        return out
