"""`SparseDeltaConfig`: which coordinates of which weights train, and how."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from peft.config import PeftConfig
from peft.utils import PeftType

from ..masks.budget import parse_block_weights
from ..masks.sparse_mask import SparseMask, normalize_module_name
from .config_checks import MASK_INITS, VALUE_DTYPES, check_field_types

__all__ = ["MASK_INITS", "VALUE_DTYPES", "SparseDeltaConfig"]


@dataclass
class SparseDeltaConfig(PeftConfig):
    """Configuration of a [`SparseDeltaModel`]: a trainable sparse delta on fixed coordinates of frozen weights.

    With no argument, `SparseDeltaConfig()` trains 1% of the entries of every linear layer but the output head, chosen
    by the near-zero prior (the smallest |W|, FFN-weighted), like `LoraConfig()` gives a usable default.

    Args:
        mask (`SparseMask`, `dict` or `str`, *optional*):
            Module name -> coordinates. A `SparseMask`, a path to a mask file written by `SparseMask.save` (read when
            the adapter is injected), or a dict of module name -> boolean tensor of the weight's shape or 1-D flat
            indices into the weight as stored. After injection it holds the resolved `SparseMask`. Not written to
            `adapter_config.json`: the coordinates are saved with the adapter weights.
        target_modules (`list[str]` or `str`, *optional*):
            Defaults to the mask's modules, or, without a mask, to every linear layer but the output head. Matched
            like PEFT's other methods (a string is a regex, a list matches names or their suffixes).
        exclude_modules (`list[str]` or `str`, *optional*): modules to leave out.
        mask_init (`"near_zero"` or `"random"`, *optional*):
            Without a mask, draw one when the adapter is injected: the smallest-|W| coordinates (`"near_zero"`, the
            default: OPD's updates favour near-zero source weights) or random ones, `mask_density` of the targeted
            entries split by `mask_block_weights`.
        mask_density (`float`, defaults to `0.01`): fraction of the targeted entries to train with `mask_init`.
        mask_block_weights (`str` or `dict`, defaults to `"ffn"`): relative density per block: `"ffn"` (FFN-heavy),
            `"uniform"`, or a dict / JSON object such as `{"ffn": 2.0, "attention": 1.0}`.
        mask_seed (`int`, defaults to `0`): seed of `mask_init="random"`.
        init_weights (`bool`, defaults to `True`): `True` starts at a zero delta (the identity); `False` starts at
            small random values (for tests).
        value_dtype (`str`, defaults to `"auto"`): dtype of the trainable values. `"auto"` is float32 on any base
            (a bf16 weight cannot hold updates below half its rounding step), or the base weights' dtype when PEFT is
            asked not to upcast adapters (`get_peft_model(..., autocast_adapter_dtype=False)`).
        value_grad (`"auto"`, `"dense"` or `"sampled"`, defaults to `"auto"`): how value gradients are computed.
            `"dense"` forms the weight gradient in row blocks of at most `grad_block_elements` entries and gathers it
            at the indices; `"sampled"` computes only the k needed dot products; `"auto"` picks `"sampled"` below
            `sampled_grad_max_density`.
        sampled_grad_max_density (`float`, defaults to `0.15`): the density below which `value_grad="auto"` samples.
        grad_block_elements (`int`, defaults to `2**24`): largest block of the weight gradient formed at once.
        compose (`"auto"`, `"always"` or `"never"`, defaults to `"auto"`): `"auto"` runs an fp32 plain layer as one
            matmul with a transient `W + delta` (as fast as the base layer); otherwise `base(x) + x @ delta^T`.
        save_dtype (`str`, *optional*): dtype of the values in `adapter_model.safetensors` (default: the values'
            own).
        index_encoding (`str`, defaults to `"auto"`): `"auto"` (smallest per module), `"gaps"`, `"bitmap"` or
            `"int32"`.
        modules_to_save (`list[str]`, *optional*): extra modules to train fully and save, as in PEFT's other methods.

    Filled in by the tuner (do not set by hand): `module_counts`, `module_index_bytes`, `module_shapes`,
    `base_model_fingerprint`; `weights_digest` (and the fingerprint's `merge_probe`) are written into the saved
    `adapter_config.json` by `save_pretrained`. `coverage()` reads the counts and shapes back.

    Example:

    ```python
    >>> import sparse_opd  # registers SPARSE_DELTA with PEFT
    >>> from peft import get_peft_model
    >>> from transformers import AutoModelForCausalLM
    >>> from sparse_opd import SparseDeltaConfig

    >>> base = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    >>> config = SparseDeltaConfig(mask_init="near_zero", mask_density=0.01)  # or mask="mask.safetensors"
    >>> model = get_peft_model(base, config)
    >>> trained, entries, matrices = model.peft_config["default"].coverage()  # about 1% of the adapted entries
    ```
    """

    mask: str | None | SparseMask | dict[str, torch.Tensor] = field(
        default=None,
        metadata={"help": "Mask file written by SparseMask.save (in Python also a SparseMask or a dict of module name "
                          "-> bool tensor / flat indices)."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules to adapt: the mask's modules by default, else every linear layer but the head."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules to leave out of target_modules."}
    )
    mask_init: Literal["near_zero", "random"] | None = field(
        default=None,
        metadata={"help": "Without a mask: draw one, 'near_zero' (smallest |W|, the default) or 'random'."},
    )
    mask_density: float = field(
        default=0.01, metadata={"help": "Fraction of the targeted weight entries trained with mask_init."}
    )
    mask_block_weights: str = field(
        default="ffn",
        metadata={"help": "Relative density per block with mask_init: 'ffn' (FFN-heavy), 'uniform' or a JSON object "
                          "like '{\"ffn\": 2.0}'."},
    )
    mask_seed: int = field(default=0, metadata={"help": "Seed of mask_init='random'."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: start at a zero delta. False: small random values (tests)."}
    )
    value_dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = field(
        default="auto",
        metadata={"help": "dtype of the trainable values; 'auto': float32, or the base dtype with "
                          "autocast_adapter_dtype=False."},
    )
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
    save_dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = field(
        default=None, metadata={"help": "dtype of saved values (default: the values' own)."}
    )
    index_encoding: Literal["auto", "gaps", "bitmap", "int32"] = field(
        default="auto", metadata={"help": "Index encoding in the adapter file; 'auto' picks the smallest per module."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train fully and save (as in other PEFT methods)."}
    )
    module_counts: dict[str, int] | None = field(
        default=None, metadata={"help": "Filled by the tuner: trained coordinates per module."}
    )
    module_index_bytes: dict[str, int] | None = field(
        default=None, metadata={"help": "Filled by the tuner: size of each module's encoded index stream."}
    )
    module_shapes: dict[str, list[int]] | None = field(
        default=None, metadata={"help": "Filled by the tuner: shape of each adapted weight as stored."}
    )
    base_model_fingerprint: dict[str, str | None] | None = field(
        default=None, metadata={"help": "Filled by the tuner: digest of the base weights the adapter was made for."}
    )
    weights_digest: str | None = field(
        default=None, metadata={"help": "Filled when saving: digest of adapter_model.safetensors, checked on load."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SPARSE_DELTA
        check_field_types(self)
        if isinstance(self.mask, os.PathLike):
            self.mask = os.fspath(self.mask)
        saved = self.module_counts is not None  # a saved adapter: its coordinates come from its adapter file
        if saved:
            self.mask_init = None
            if self.mask is not None:
                raise ValueError(
                    "a config with module_counts (a saved adapter, whose coordinates are in "
                    "adapter_model.safetensors) cannot also name a mask: remove 'mask' from adapter_config.json"
                )
        if isinstance(self.mask, dict) and not self.mask:
            raise ValueError("mask is empty: name at least one module and its coordinates")
        if self.mask is not None and self.mask_init is not None:
            raise ValueError(
                "give either mask (the coordinates) or mask_init (draw them), not both: they contradict each other"
            )
        if self.mask is None and not saved and self.mask_init is None:
            self.mask_init = "near_zero"  # the default: FFN-weighted near-zero prior
        if self.mask_init is not None and not 0 < self.mask_density <= 1:
            raise ValueError(f"mask_density must be in (0, 1], got {self.mask_density!r}")
        try:
            self.mask_block_weights = parse_block_weights(self.mask_block_weights)
        except ValueError as err:
            raise ValueError(f"mask_block_weights: {err}") from None
        if self.mask is not None and not isinstance(self.mask, str) and self.target_modules is None:
            names = self.mask.modules() if isinstance(self.mask, SparseMask) else list(self.mask)
            self.target_modules = sorted({normalize_module_name(n) for n in names})
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        """PEFT's `from_pretrained`, after preparing a local folder for loading: an interrupted save into it is
        finished or discarded (`sparse_opd.tuner.atomic_save.recover`), and its files are checked to exist and be
        readable, so that a broken folder is one clear error (`sparse_opd.tuner.loading.check_adapter_folder`)."""
        from .atomic_save import recover
        from .loading import check_adapter_folder

        folder = os.path.join(os.fspath(pretrained_model_name_or_path), subfolder or "")
        if os.path.isdir(folder):
            recover(folder)
            check_adapter_folder(folder)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    def coverage(self) -> tuple[int, int, int]:
        """``(trained coordinates, entries of the adapted weights, adapted weight matrices)``, from the counts and
        shapes the tuner filled in (zeros before the adapter is injected)."""
        counts, shapes = self.module_counts or {}, self.module_shapes or {}
        return sum(counts.values()), sum(rows * cols for rows, cols in shapes.values()), len(counts)

    def to_dict(self) -> dict:
        # The mask lives in adapter_model.safetensors (compactly encoded), not in JSON.
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "mask"}
