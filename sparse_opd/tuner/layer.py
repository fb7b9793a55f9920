"""`SparseDeltaLayer`: trainable values on fixed coordinates of a frozen weight."""

from __future__ import annotations

import warnings
import zlib

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..distributed import full_numel
from ..masks.encoding import (
    IndexEncodingError,
    decode_indices,
    encode_indices,
    max_stream_bytes,
    validate_flat_indices,
)
from ..masks.targets import stored_shape
from .config import VALUE_DTYPES
from .functional import (
    CsrPattern,
    DeltaSpec,
    merged_entries,
    scatter_delta,
    sparse_delta_linear,
    sparse_delta_matmul,
)
from .index_streams import IndexStreamDict


class SparseDeltaLayer(BaseTunerLayer):
    """Adds ``scatter(sparse_delta_indices, sparse_delta_values)`` to the base layer's weight.

    Subclasses say how the stored weight maps to a matmul (``transposed``) and whether the weight can be read as a
    plain tensor (``quantized``).
    """

    adapter_layer_names = ("sparse_delta_values",)
    other_param_names = ("sparse_delta_indices", "sparse_delta_index_stream", "delta_specs", "compose_mode")
    transposed = False
    quantized = False

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self._module_name = ""
        self.sparse_delta_values = nn.ParameterDict({})
        # decoded int64 flat indices used for compute; the persistent form is the encoded stream
        self.sparse_delta_indices = BufferDict({}, persistent=False)
        self.sparse_delta_index_stream = IndexStreamDict(self)
        self.delta_specs: dict[str, DeltaSpec] = {}
        self.compose_mode: dict[str, str] = {}
        # original weight entries at the adapter's indices while it is merged, so unmerge is bit-exact
        self._merge_backup: dict[str, torch.Tensor] = {}
        # adapters built from a saved config alone, whose indices must still come from an adapter file
        self._placeholder_adapters: set[str] = set()
        # adapters built from a saved config whose loaded file is checked at first use (`loading.PendingLoad`)
        self._pending_loads: dict = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.out_features, self.in_features = self._linear_features()

    def _linear_features(self) -> tuple[int, int]:
        rows, cols = self.weight_shape
        return (cols, rows) if self.transposed else (rows, cols)

    # shape ----------------------------------------------------------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight as stored (``(out, in)``; GPT-2's ``Conv1D`` stores ``(in, out)``)."""
        return stored_shape(self.get_base_layer())

    @property
    def weight_numel(self) -> int:
        return self.weight_shape[0] * self.weight_shape[1]

    # adapters -------------------------------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        indices: torch.Tensor | None,
        config,
        module_name: str = "",
        placeholder: tuple[int, int] | None = None,
    ) -> None:
        """Add an adapter on ``indices``; or, with ``placeholder=(k, stream_bytes)``, reserve room for one whose
        coordinates an adapter file will fill in."""
        self._module_name = module_name
        numel = self.weight_numel
        if placeholder is not None:
            k, stream_bytes = placeholder
            if not 0 < k <= numel:
                raise ValueError(f"{module_name}: the config asks for {k} coordinates in a weight of {numel} entries")
            if not 1 < stream_bytes <= max_stream_bytes(numel, k):
                raise ValueError(
                    f"{module_name}: the config claims a {stream_bytes}-byte index stream, more than {k} coordinates "
                    f"of a weight of {numel} entries can take ({max_stream_bytes(numel, k)}); the config is corrupted"
                )
            indices = torch.arange(k, dtype=torch.long) * (numel // k)
            stream = torch.zeros(stream_bytes, dtype=torch.uint8)
            self._placeholder_adapters.add(adapter_name)
        else:
            indices = validate_flat_indices(indices, numel, name=module_name or adapter_name)
            stream = encode_indices(indices, numel, config.index_encoding)
        dtype = VALUE_DTYPES.get(config.value_dtype, torch.float32)  # "auto": fp32 unless PEFT says otherwise
        k = indices.numel()
        if placeholder is not None:  # NaN until the adapter file fills them: never silently a zero delta
            values = torch.full((k,), float("nan"), dtype=dtype)
        elif config.init_weights:
            values = torch.zeros(k, dtype=dtype)
        else:
            gen = torch.Generator().manual_seed(zlib.crc32(f"{module_name}/{adapter_name}".encode()))
            values = (torch.randn(k, generator=gen, dtype=torch.float32) * 0.02).to(dtype)
        self.sparse_delta_values[adapter_name] = nn.Parameter(values)
        self.sparse_delta_indices[adapter_name] = indices
        self.sparse_delta_index_stream.set_encoded(adapter_name, stream)
        self.delta_specs[adapter_name] = DeltaSpec(
            shape=self.weight_shape,
            transposed=self.transposed,
            value_grad=config.value_grad,
            sampled_max_density=config.sampled_grad_max_density,
            block_elements=config.grad_block_elements,
        )
        self.compose_mode[adapter_name] = config.compose
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _on_index_stream_loaded(self, adapter_name: str) -> None:
        """A loader wrote this adapter's index stream: decode it into the compute indices."""
        stream = self.sparse_delta_index_stream[adapter_name]
        name = getattr(self, "_module_name", "") or adapter_name
        indices = decode_indices(stream.cpu(), self.weight_numel, name=name)
        expected = full_numel(self.sparse_delta_values[adapter_name])  # ZeRO-3 keeps only a partition
        if indices.numel() != expected:
            raise IndexEncodingError(
                f"{name}: the adapter file holds {indices.numel()} indices for {expected} values "
                "(adapter_config.json and adapter_model.safetensors do not belong together)"
            )
        self.sparse_delta_indices[adapter_name] = indices.to(stream.device)
        self._placeholder_adapters.discard(adapter_name)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # Unlike PEFT's default, keep the values' own dtype (fp32 by default) on a bf16/fp16/quantized base.
        if device is None:
            base = self.get_base_layer()
            device = next((p.device for p in base.parameters() if p.device.type != "meta"), None)
        if device is None:
            return
        if adapter_name in self.sparse_delta_values:
            param = self.sparse_delta_values[adapter_name]
            if param.device.type != "meta" and param.device != device:
                self.sparse_delta_values[adapter_name] = nn.Parameter(
                    param.data.to(device), requires_grad=param.requires_grad
                )
        if adapter_name in self.sparse_delta_indices:
            self.sparse_delta_indices[adapter_name] = self.sparse_delta_indices[adapter_name].to(device)
            stream = self.sparse_delta_index_stream[adapter_name].to(device)
            self.sparse_delta_index_stream.set_encoded(adapter_name, stream)

    def base_dtype(self) -> torch.dtype:
        """The dtype the base layer computes in (a quantized layer's compute dtype, float32 if unknown)."""
        base = self.get_base_layer()
        if self.quantized:
            return getattr(base, "compute_dtype", None) or torch.float32
        return base.weight.dtype

    def cast_values(self, adapter_name: str, dtype: torch.dtype) -> None:
        param = self.sparse_delta_values[adapter_name]
        if param.dtype != dtype:
            self.sparse_delta_values[adapter_name] = nn.Parameter(param.data.to(dtype),
                                                                  requires_grad=param.requires_grad)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense delta of one adapter in the stored weight layout (a new tensor; use transiently)."""
        return scatter_delta(self.sparse_delta_values[adapter], self.sparse_delta_indices[adapter], self.weight_shape)

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.sparse_delta_values]

    # forward --------------------------------------------------------------------------------------------------------
    def _can_compose(self, x: torch.Tensor, adapters: list[str]) -> bool:
        modes = {self.compose_mode[a] for a in adapters}
        if "never" in modes or self.quantized:
            return False
        base = self.get_base_layer()
        weight = base.weight
        always = "always" in modes
        if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook"):
            return False  # offloading / ZeRO-3 hooks must see the base layer's own forward
        if weight.dtype != x.dtype or torch.is_autocast_enabled(x.device.type):
            return False
        return always or weight.dtype in (torch.float32, torch.float64)

    def _sparse_path(self, x: torch.Tensor, adapters: list[str]) -> list[CsrPattern] | None:
        """The adapters' CSR patterns when the delta's product can be computed from the k entries alone (no gradient
        needed, and ``T x k`` fits a gradient block): a generated token then costs O(k) instead of a dense delta (or
        ``W + delta``) of the whole weight. None otherwise."""
        if torch.is_grad_enabled() and (x.requires_grad or any(self.sparse_delta_values[a].requires_grad
                                                             for a in adapters)):
            return None
        tokens = x.numel() // x.shape[-1]
        patterns = [self._csr_pattern(a) for a in adapters]
        if any(tokens * p.col.numel() > self.delta_specs[a].block_elements for a, p in zip(adapters, patterns)):
            return None
        return patterns

    def _csr_pattern(self, adapter: str) -> CsrPattern:
        """The adapter's coordinates as a CSR pattern (int32: 4 bytes per coordinate and per row), built at the first
        gradient-free forward and rebuilt when the coordinates or their device change."""
        indices = self.sparse_delta_indices[adapter]
        key = (indices.data_ptr(), indices.numel(), indices.device)
        cache = self.__dict__.setdefault("_csr_patterns", {})
        pattern = cache.get(adapter)
        if pattern is None or pattern.key != key:
            pattern = cache[adapter] = CsrPattern.build(indices, self.delta_specs[adapter], key)
        return pattern

    def _delta_output(self, x, weight, adapters, observe: bool = True):
        spec = self.delta_specs[adapters[0]]
        values = [self.sparse_delta_values[a] for a in adapters]
        indices = [self.sparse_delta_indices[a] for a in adapters]
        if any(self.delta_specs[a] != spec for a in adapters[1:]):
            return sum(self._delta_output(x, weight if i == 0 else None, [a], observe=i == 0)
                       for i, a in enumerate(adapters))
        observer = self.__dict__.get("weight_grad_observer") if observe else None
        return sparse_delta_linear(x, weight, spec, values, indices, observer)

    def set_weight_grad_observer(self, observer) -> None:
        """While set, every backward through this layer shows ``observer(first_row, block)`` the whole gradient of
        the base weight (stored layout, float32, row blocks of at most `grad_block_elements` entries); `None` removes
        it. Used by gradient-statistics mask discovery, which never holds a layer's whole gradient."""
        self.__dict__["weight_grad_observer"] = observer

    def replace_indices(self, adapter_name: str, indices: torch.Tensor, encoding: str = "auto") -> None:
        """Move a not-yet-trained adapter to other coordinates of the same count, in place (the buffers keep their
        identity, so a model already wrapped for DDP / FSDP2 / ZeRO-3 trains the new coordinates)."""
        current = self.sparse_delta_indices[adapter_name]
        name = self._module_name or adapter_name
        indices = validate_flat_indices(indices, self.weight_numel, name=name)
        if indices.numel() != current.numel():
            raise ValueError(f"{name}: {indices.numel()} new coordinates for an adapter of {current.numel()}")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"{name}: adapter {adapter_name!r} is merged; unmerge it before moving its coordinates")
        current.copy_(indices.to(current.device))
        stream = encode_indices(indices.cpu(), self.weight_numel, encoding)
        self.sparse_delta_index_stream.set_encoded(adapter_name, stream.to(current.device))
        self.__dict__.get("_csr_patterns", {}).pop(adapter_name, None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapters = self._active()
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        if self._placeholder_adapters or self._pending_loads:
            self._check_loaded(adapters)
        patterns = self._sparse_path(x, adapters)
        if patterns is not None:  # generation and evaluation: kept lean, it runs per layer per token
            result = self.base_layer(x, *args, **kwargs)
            values = [self.sparse_delta_values[a] for a in adapters]
            return result.add_(sparse_delta_matmul(x.to(result.dtype), values, patterns))
        base = self.get_base_layer()
        if self._can_compose(x, adapters):
            out = self._delta_output(x, base.weight, adapters)
            return out if base.bias is None else out + base.bias
        result = self.base_layer(x, *args, **kwargs)
        delta_x = x if x.dtype == result.dtype else x.to(result.dtype)
        return result + self._delta_output(delta_x, None, adapters)

    def _check_loaded(self, adapters) -> None:
        """Refuse to use an adapter whose file never filled it in, or filled it with what its checks refuse (run once
        per loaded adapter for all its layers: `sparse_opd.tuner.loading.PendingLoad`)."""
        for adapter in [a for a in adapters if a in self._pending_loads]:
            self._pending_loads[adapter].verify()
        unloaded = self._placeholder_adapters.intersection(adapters)
        if unloaded:
            raise RuntimeError(
                f"sparse-delta adapter(s) {sorted(unloaded)} of {self._module_name or 'a layer'} were built from a "
                "config without a mask and their coordinates were never loaded (the adapter file has no index "
                "stream for this module); use PeftModel.from_pretrained / load_adapter with a complete adapter, or "
                "pass mask=..."
            )

    # merging --------------------------------------------------------------------------------------------------------
    def _refuse_quantized_merge(self):
        if self.quantized:
            raise ValueError(
                f"cannot merge a sparse delta into the quantized layer {type(self.get_base_layer()).__name__}: "
                "re-quantizing would round the (typically sub-step) update away and unmerge could not restore the "
                "base. Load the base model in float32/bfloat16 to merge, or keep the adapter unmerged."
            )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self._refuse_quantized_merge()
        self._check_loaded(adapter_names)
        flat = self.get_base_layer().weight.data.view(-1)
        for adapter in adapter_names:
            if adapter not in self.sparse_delta_values:
                continue
            idx = self.sparse_delta_indices[adapter]
            original = flat[idx].clone()
            merged = merged_entries(original, self.sparse_delta_values[adapter].detach())
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs or infs in the merged weights: adapter {adapter!r} is broken")
            self._merge_backup[adapter] = original
            flat.index_copy_(0, idx, merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        flat = self.get_base_layer().weight.data.view(-1)
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self._merge_backup:
                flat.index_copy_(0, self.sparse_delta_indices[adapter], self._merge_backup.pop(adapter))

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weights; unmerge it before deleting")
        super().delete_adapter(adapter_name)
        self.__dict__.get("_csr_patterns", {}).pop(adapter_name, None)
        self._placeholder_adapters.discard(adapter_name)
        self._pending_loads.pop(adapter_name, None)


class SparseDeltaModule(nn.Module, SparseDeltaLayer):
    """Module form of the layer; subclasses only change how the stored weight is read."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, indices, config, module_name: str = "", placeholder=None,
        **kwargs
    ):
        super().__init__()
        SparseDeltaLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, indices, config, module_name=module_name, placeholder=placeholder)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # nn.Module's placeholder forward precedes the mixin's in the MRO, so name the real one explicitly.
        return SparseDeltaLayer.forward(self, x, *args, **kwargs)


class Linear(SparseDeltaModule):
    """Sparse delta on an ``nn.Linear`` (weight stored ``(out, in)``)."""
