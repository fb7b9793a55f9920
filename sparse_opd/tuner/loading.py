"""What an adapter file must satisfy before any of it reaches the model: loading is all-or-nothing.

An adapter file may hold exactly one adapter's own tensors: per adapted module its values and index stream, and the
tensors of its `modules_to_save`. Anything else (a base weight, another adapter's values) would be copied over the
model by the loader, so it is refused.

- Through PEFT (`PeftModel.from_pretrained`, `load_adapter`, `AutoPeftModel...`), `check_adapter_state` runs on the
  whole state dict before PEFT copies a single tensor: names, counts, shapes, decoded index streams, dtypes, finite
  and bounded values, and, for an adapter built from its saved config, the `weights_digest` that pairs the config with
  these weights. Every size is checked against the model's own weight before anything proportional to a claimed size
  is allocated or decoded.
- transformers' `model.load_adapter` copies the tensors itself, with no hook before the copy. An adapter built from a
  saved config therefore starts as NaN placeholders with a `PendingLoad` record, and its first use (forward, merge,
  save, `adapter_mask`, `add_weighted_adapter`) runs the same checks on what was loaded; a model tensor outside the
  adapter that the loader replaced is put back (the loader replaces tensors rather than writing into them) before the
  error is raised.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref

import torch
from torch import nn

from ..distributed import full_shape
from ..masks.encoding import IndexEncodingError, decode_indices, max_stream_bytes
from ..masks.sparse_mask import normalize_module_name
from .config_checks import VALUE_DTYPES
from .layer import SparseDeltaLayer

VALUES, STREAM = "sparse_delta_values", "sparse_delta_index_stream"
_WORDS = {VALUES: "sparse-delta values", STREAM: "sparse-delta indices"}
PREFIX = "base_model.model."
# No trained delta comes near this (the float16 range); a larger value overflows a merged fp16 weight and the logits.
MAX_ABS_VALUE = 65504.0
CONFIG_BYTES_LIMIT = 16 << 20  # adapter_config.json: ~100 KB for a 70-layer model
_CHUNK = 1 << 20


# ------------------------------------------------------------------------------------------------ the adapter's keys
def _aux_keys(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, str, torch.Tensor]]:
    """Keys of ``adapter_name``'s `modules_to_save` (PEFT's auxiliary wrappers), in the file's form and the model's,
    without PEFT's prefix -> ``(module, name in the file, the model's tensor)``."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, AuxiliaryTrainingWrapper):
            continue
        plain = name.removeprefix("_fsdp_wrapped_module.").removeprefix(PREFIX)
        tensors = module.state_dict(keep_vars=True)
        for saved, loaded in module.adapter_state_dict_load_map(adapter_name).items():
            entry = (plain, saved, tensors[loaded])
            out[f"{plain}.{saved}"] = out[f"{plain}.{loaded}"] = entry
    return out


def _identity(key: str, adapter_name: str, aux: dict) -> tuple[str, str] | None:
    """``(module, part)`` of a key that belongs to ``adapter_name`` (file or model form), else None."""
    plain = key.removeprefix(PREFIX)
    for kind in (VALUES, STREAM):
        for marker in (f".{kind}.{adapter_name}", f".{kind}"):
            if plain.endswith(marker):
                return normalize_module_name(plain[: -len(marker)]), kind
    entry = aux.get(plain)
    return (entry[0], entry[1]) if entry else None


def _layers(model: nn.Module, adapter_name: str) -> dict[str, SparseDeltaLayer]:
    return {normalize_module_name(n): m for n, m in model.named_modules()
            if isinstance(m, SparseDeltaLayer) and adapter_name in m.sparse_delta_values}


def adapter_digest(entries: dict[tuple[str, str], torch.Tensor]) -> str:
    """SHA-256 over an adapter's tensors, ``(module, part) -> tensor``, in a canonical form: floating-point tensors as
    float64 (exact for every float dtype, so the file and the values a loader cast to another dtype agree), others as
    stored. The same for the file that is saved, the state dict loaded from it and the model it was loaded into."""
    digest = hashlib.sha256()
    for module, part in sorted(entries):
        tensor = entries[module, part].detach()
        digest.update(f"{module}/{part}/{tuple(tensor.shape)};".encode())
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), _CHUNK):
            chunk = flat[start:start + _CHUNK]
            chunk = chunk.to(torch.float64) if chunk.is_floating_point() else chunk
            digest.update(chunk.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def state_entries(state: dict[str, torch.Tensor], model: nn.Module, adapter_name: str) -> dict:
    """``(module, part) -> tensor`` of a state dict holding one adapter (file or model keys); a key that is not one of
    the adapter's own tensors, or one given twice, is a `ValueError`."""
    aux = _aux_keys(model, adapter_name)
    entries = {}
    for key, tensor in state.items():
        identity = _identity(key, adapter_name, aux)
        if identity is None:
            raise ValueError(
                f"the adapter file holds {key}, which is not a tensor of sparse-delta adapter {adapter_name!r}: "
                "loading it would overwrite another part of the model (a tampered or foreign file); nothing was loaded"
            )
        if identity in entries:
            raise ValueError(f"the adapter file holds the tensor of {identity[0]} ({identity[1]}) twice (as {key}); "
                             "a tampered or foreign file")
        entries[identity] = tensor
    return entries


def model_entries(model: nn.Module, adapter_name: str) -> dict:
    """``(module, part) -> tensor`` of ``adapter_name`` as it is in the model."""
    entries = {}
    for name, layer in _layers(model, adapter_name).items():
        entries[name, VALUES] = layer.sparse_delta_values[adapter_name]
        entries[name, STREAM] = layer.sparse_delta_index_stream[adapter_name]
    for module, saved, tensor in _aux_keys(model, adapter_name).values():
        entries[module, saved] = tensor
    return entries


# ------------------------------------------------------------------------------------------------------ the checks
def check_values(module: str, values: torch.Tensor) -> None:
    """A `ValueError` unless ``values`` are a 1-D tensor of a value dtype, finite and within `MAX_ABS_VALUE`."""
    if values.dtype not in VALUE_DTYPES.values():
        raise ValueError(f"{module}: sparse-delta values of dtype {values.dtype}; an adapter file holds "
                         f"{', '.join(VALUE_DTYPES)} values (corrupted or foreign file)")
    detached = values.detach()
    bad = int((~torch.isfinite(detached)).sum())
    if bad:
        raise ValueError(f"{module}: the adapter file holds {bad} non-finite values (NaN or inf)")
    largest = float(detached.abs().max()) if detached.numel() else 0.0
    if largest > MAX_ABS_VALUE:
        raise ValueError(f"{module}: the adapter file holds a value of magnitude {largest:.3g}, beyond any trained "
                         f"delta (limit {MAX_ABS_VALUE:g}: it would overflow the weights or logits); corrupted file")


def check_adapter_state(model: nn.Module, config, adapter_name: str, state: dict[str, torch.Tensor],
                        from_saved_config: bool) -> dict:
    """Raise a `ValueError` naming the first problem of ``state`` (see the module docstring); modify nothing. With
    ``from_saved_config`` (the adapter was built from the config saved beside these weights) the config's
    `weights_digest` must be present and match. Returns the entries ``(module, part) -> tensor``."""
    layers = _layers(model, adapter_name)
    entries = state_entries(state, model, adapter_name)
    counts = config.module_counts or {}
    seen = {STREAM: set(), VALUES: set()}
    for (module, kind), tensor in entries.items():
        if kind not in seen:
            continue
        layer = layers.get(module)
        if layer is None or module not in counts:
            raise ValueError(
                f"the adapter file has {_WORDS[kind]} for {module}, which adapter {adapter_name!r} does not adapt "
                "(adapter_config.json and adapter_model.safetensors do not belong together)"
            )
        _check_module(layer, module, kind, tensor, int(counts[module]), adapter_name)
        seen[kind].add(module)
    for kind, modules in seen.items():
        missing = sorted(set(counts) - modules)
        if missing:
            raise ValueError(
                f"the adapter file has no {_WORDS[kind]} for {len(missing)} module(s), e.g. {missing[:3]}: "
                "it is truncated, from another PEFT method, or does not belong to this adapter_config.json"
            )
    _check_aux(model, adapter_name, entries)
    if from_saved_config:
        check_digest(config, adapter_digest(entries), ValueError)
    return entries


def check_not_merged(model: nn.Module, adapter_name: str) -> None:
    merged = sorted(n for n, layer in _layers(model, adapter_name).items() if adapter_name in layer.merged_adapters)
    if merged:
        raise ValueError(
            f"adapter {adapter_name!r} is merged into the base weights (e.g. {merged[0]}); loading over it would "
            "orphan the saved original entries. Call unmerge_adapter() first, or load under another adapter_name"
        )


def check_digest(config, actual: str, error: type[Exception]) -> None:
    if not config.weights_digest:
        raise error("adapter_config.json has no weights_digest, so nothing pairs it with adapter_model.safetensors: "
                    "save the adapter again with sparse_opd")
    if actual != config.weights_digest:
        raise error(
            "adapter_model.safetensors is not the file adapter_config.json was saved with (weights_digest differs): "
            "files mixed from two adapters, or a save that was interrupted (loading the folder with "
            "PeftModel.from_pretrained finishes it)"
        )


def _check_aux(model: nn.Module, adapter_name: str, entries: dict) -> None:
    for module, saved, tensor in {v[:2]: v for v in _aux_keys(model, adapter_name).values()}.values():
        given = entries.get((module, saved))
        if given is None:
            raise ValueError(f"the adapter file has no {saved} for {module}, one of the adapter's modules_to_save "
                             "(truncated or foreign file)")
        if given.shape != tensor.shape or given.is_floating_point() != tensor.is_floating_point():
            raise ValueError(f"{module}.{saved} in the adapter file has dtype {given.dtype} and shape "
                             f"{tuple(given.shape)}, the model's is {tensor.dtype} {tuple(tensor.shape)}")
        if given.is_floating_point() and not bool(torch.isfinite(given.detach()).all()):
            raise ValueError(f"{module}.{saved} (modules_to_save) in the adapter file holds non-finite values")


def _check_module(layer: SparseDeltaLayer, module: str, kind: str, tensor: torch.Tensor, k: int,
                  adapter_name: str) -> None:
    numel = layer.weight_numel
    current = getattr(layer, kind)[adapter_name]
    if kind == STREAM:
        if tensor.dtype != torch.uint8 or tensor.dim() != 1:
            raise ValueError(f"{module}: index stream of dtype {tensor.dtype} and shape {tuple(tensor.shape)}, "
                             "expected a 1-D uint8 stream (corrupted or foreign file)")
        if not 1 < tensor.numel() <= max_stream_bytes(numel, k):  # before decoding anything
            raise ValueError(f"{module}: a {tensor.numel()}-byte index stream cannot describe {k} coordinates of a "
                             f"weight of {numel} entries (corrupted or foreign file)")
        try:
            indices = decode_indices(tensor, numel, name=module)
        except IndexEncodingError as err:
            raise ValueError(f"corrupted or foreign sparse-delta adapter file: {err}") from None
        if indices.numel() != k:
            raise ValueError(f"{module}: the adapter file holds {indices.numel()} indices but adapter_config.json "
                             f"says {k} (mismatched config and weights)")
    else:
        if not tensor.is_floating_point() or tensor.dim() != 1 or tensor.numel() != k:
            raise ValueError(f"{module}: expected {k} floating-point values, the file holds dtype {tensor.dtype} "
                             f"shape {tuple(tensor.shape)} (mismatched config and weights)")
        check_values(module, tensor)
    if full_shape(current) != tuple(tensor.shape):  # a ZeRO-3 rank holds a partition of the values
        raise ValueError(
            f"{module}: the file's {_WORDS[kind]} ({tuple(tensor.shape)}) do not fit adapter {adapter_name!r} as it "
            f"is ({full_shape(current)}); delete_adapter({adapter_name!r}) first, or load under another adapter_name"
        )


def check_adapter_folder(folder: str) -> None:
    """Before PEFT reads a local adapter folder: its config is of a sane size and its weights file exists and has a
    readable safetensors header, so that a missing, truncated or corrupted file is one `OSError` / `ValueError` that
    names it (PEFT would raise safetensors' bare deserialization error)."""
    from safetensors import safe_open

    config = os.path.join(folder, "adapter_config.json")
    if os.path.isfile(config) and os.path.getsize(config) > CONFIG_BYTES_LIMIT:
        raise ValueError(f"{config} is {os.path.getsize(config) >> 20} MiB; a sparse-delta adapter_config.json is at "
                         f"most a few hundred KB (limit {CONFIG_BYTES_LIMIT >> 20} MiB): corrupted or hostile file")
    names = [os.path.join(folder, n) for n in ("adapter_model.safetensors", "adapter_model.bin")]
    weights = [p for p in names if os.path.isfile(p)]
    odd = [p for p in names if os.path.lexists(p) and not os.path.isfile(p)]
    if odd and not weights:
        raise ValueError(
            f"{odd[0]} is not a regular file (a folder, FIFO, device or dangling link): refusing to read it")
    if not weights:
        raise FileNotFoundError(f"{folder} has no adapter_model.safetensors: the adapter was not saved completely")
    if not weights[0].endswith(".safetensors"):
        return
    try:
        with safe_open(weights[0], framework="pt") as f:
            keys = [k.removeprefix(PREFIX).rpartition(".")[0] for k in f.keys()]  # noqa: SIM118 (safe_open)
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error type for broken files)
        raise ValueError(f"{weights[0]} is not a readable safetensors file ({err}); it is truncated or "
                         "corrupted: save or download it again") from None
    try:
        with open(config, encoding="utf-8") as f:
            extra = json.load(f).get("modules_to_save") or []
    except (OSError, ValueError, AttributeError):
        return  # PEFT reports an unreadable config itself
    missing = [m for m in extra if isinstance(m, str) and not any(k == m or k.endswith("." + m) for k in keys)]
    if missing:  # PEFT would fail with a bare KeyError before any of our checks
        raise ValueError(f"adapter_config.json lists {missing[0]} in modules_to_save, but {weights[0]} has no tensor "
                         "of it: the file is truncated or does not belong to this config")


# ------------------------------------------------------------------------------------------ the first-use checks
class PendingLoad:
    """A sparse-delta adapter built from a saved config (NaN placeholders) whose file has not been checked yet.

    Registered on each of the adapter's layers (``layer._pending_loads[adapter_name]``); `verify` runs at the
    adapter's first use and removes the record when everything holds. When PEFT's loader checked the whole file
    before copying it (`mark_checked`), only the per-layer checks remain; otherwise (transformers' `load_adapter`, or
    tensors copied by hand) the loaded tensors are also checked against the config's `weights_digest`, and any model
    tensor outside the adapter that was replaced since the adapter was built is put back.
    """

    def __init__(self, model: nn.Module, config, adapter_name: str):
        self.config, self.adapter_name = config, adapter_name
        self.layers = _layers(model, adapter_name)
        self.model = weakref.ref(model)
        own = set(_aux_keys(model, adapter_name))
        self.outside = {k: t for k, t in model.state_dict(keep_vars=True).items()
                        if _identity(k, adapter_name, {}) is None and k.removeprefix(PREFIX) not in own}
        self.file_checked = False
        for layer in self.layers.values():
            layer._pending_loads[adapter_name] = self

    @staticmethod
    def of(model: nn.Module, adapter_name: str) -> PendingLoad | None:
        for layer in _layers(model, adapter_name).values():
            if adapter_name in layer._pending_loads:
                return layer._pending_loads[adapter_name]
        return None

    def mark_checked(self) -> None:
        """PEFT's loader checked the whole file (`check_adapter_state`) before copying it."""
        self.file_checked, self.outside = True, {}

    def verify(self) -> None:
        """Raise a `RuntimeError` naming what is wrong with the loaded adapter; forget the record when all holds."""
        adapter = self.adapter_name
        for name, layer in self.layers.items():
            if adapter in layer._placeholder_adapters:
                raise RuntimeError(
                    f"sparse-delta adapter {adapter!r} of {name} was built from a config without a mask and its "
                    "coordinates were never loaded (no index stream for this module was loaded); use "
                    "PeftModel.from_pretrained / load_adapter with a complete adapter, or pass mask=..."
                )
            values = layer.sparse_delta_values[adapter]
            if values.device.type == "meta":
                raise RuntimeError(f"{name}: the adapter file has no values for adapter {adapter!r}")
            try:
                check_values(name, values)
            except ValueError as err:
                raise RuntimeError(f"{err} (adapter {adapter!r}: its file is missing this module's values or holds "
                                   "corrupted ones)") from None
        if not self.file_checked:
            model = self.model()
            if model is not None:
                self._restore_outside(model)
                entries = model_entries(model, adapter)
                try:
                    _check_aux(model, adapter, entries)
                except ValueError as err:
                    raise RuntimeError(str(err)) from None
                check_digest(self.config, adapter_digest(entries), RuntimeError)
        for layer in self.layers.values():
            layer._pending_loads.pop(adapter, None)
        self.outside = {}

    def _restore_outside(self, model: nn.Module) -> None:
        current = model.state_dict(keep_vars=True)
        replaced = sorted(k for k, t in self.outside.items() if current.get(k) is not t)
        if not replaced:
            return
        for key in replaced:
            owner, _, name = key.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            store = module._parameters if name in module._parameters else module._buffers
            store[name] = self.outside[key]
        raise RuntimeError(
            f"the adapter file of {self.adapter_name!r} held {len(replaced)} tensor(s) outside the adapter, e.g. "
            f"{replaced[0]}, which the loader copied over the model; they were put back. A tampered or foreign file: "
            "the adapter is not usable"
        )
