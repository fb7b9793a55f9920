"""What an adapter file must satisfy before any of it reaches the model: loading is all-or-nothing.

`check_adapter_state` runs on the whole (remapped) state dict before PEFT copies a single tensor, so a truncated,
corrupted, oversized or foreign file raises a `ValueError` naming the module and leaves the model as it was. Every
size is checked against the model's own weight before anything proportional to a claimed size is allocated or
decoded. `adapter_digest` pairs `adapter_config.json` with the weights it was saved with.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

from ..masks.encoding import IndexEncodingError, decode_indices, max_stream_bytes
from ..masks.sparse_mask import normalize_module_name
from .layer import SparseDeltaLayer

VALUES, STREAM = "sparse_delta_values", "sparse_delta_index_stream"
_WORDS = {VALUES: "sparse-delta values", STREAM: "sparse-delta indices"}


def _split_key(key: str, adapter_name: str | None) -> tuple[str, str] | None:
    """``(module, kind)`` of an adapter tensor key (with or without the adapter name at the end), else None."""
    for kind in (VALUES, STREAM):
        for marker in ((f".{kind}.{adapter_name}", f".{kind}") if adapter_name else (f".{kind}",)):
            if key.endswith(marker):
                return normalize_module_name(key[: -len(marker)]), kind
    return None


def adapter_digest(state: dict[str, torch.Tensor], adapter_name: str | None = None) -> str:
    """SHA-256 over every module's values and index stream (bytes as stored), in module order: the same for the
    state dict that is saved and the one loaded back from the file."""
    digest = hashlib.sha256()
    entries = sorted((split, key) for key in state if (split := _split_key(key, adapter_name)) is not None)
    for (module, kind), key in entries:
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{module}/{kind}/{tensor.dtype}/{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:32]


def check_adapter_state(model: nn.Module, config, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
    """Raise a `ValueError` naming the first problem of ``state`` (see the module docstring); modify nothing."""
    layers = {normalize_module_name(n): m for n, m in model.named_modules() if isinstance(m, SparseDeltaLayer)}
    merged = sorted(n for n, layer in layers.items() if adapter_name in layer.merged_adapters)
    if merged:
        raise ValueError(
            f"adapter {adapter_name!r} is merged into the base weights (e.g. {merged[0]}); loading over it would "
            "orphan the saved original entries. Call unmerge_adapter() first, or load under another adapter_name"
        )
    counts = config.module_counts or {}
    seen = {STREAM: set(), VALUES: set()}
    for key, tensor in state.items():
        split = _split_key(key, adapter_name)
        if split is None:
            continue
        module, kind = split
        layer = layers.get(module)
        if layer is None or adapter_name not in layer.sparse_delta_values or module not in counts:
            raise ValueError(
                f"the adapter file has {_WORDS[kind]} for {module}, which adapter {adapter_name!r} does not adapt "
                "(adapter_config.json and adapter_model.safetensors do not belong together)"
            )
        _check_module(layer, module, kind, tensor, int(counts[module]), config, adapter_name)
        seen[kind].add(module)
    for kind, modules in seen.items():
        missing = sorted(set(counts) - modules)
        if missing:
            raise ValueError(
                f"the adapter file has no {_WORDS[kind]} for {len(missing)} module(s), e.g. {missing[:3]}: "
                "it is truncated, "
                "from another PEFT method, or does not belong to this adapter_config.json"
            )
    expected = getattr(config, "weights_digest", None)
    if expected and adapter_digest(state, adapter_name) != expected:
        raise ValueError(
            "adapter_model.safetensors is not the file adapter_config.json was saved with (weights_digest differs): "
            "an interrupted save or files mixed from two adapters"
        )


def _check_module(layer: SparseDeltaLayer, module: str, kind: str, tensor: torch.Tensor, k: int, config,
                  adapter_name: str) -> None:
    numel = layer.weight_numel
    shape = (config.module_shapes or {}).get(module)
    if shape is not None and tuple(shape) != tuple(layer.weight_shape):
        raise ValueError(f"{module}: adapter_config.json records a weight of shape {tuple(shape)} but the model's is "
                         f"{tuple(layer.weight_shape)}: the adapter belongs to another model")
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
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"{module}: the adapter file holds {bad} non-finite values (NaN or inf)")
    if current.shape != tensor.shape:
        raise ValueError(
            f"{module}: the file's {_WORDS[kind]} ({tuple(tensor.shape)}) do not fit adapter {adapter_name!r} as it is "
            f"({tuple(current.shape)}); delete_adapter({adapter_name!r}) first, or load under another adapter_name"
        )


def patch_peft_load_errors() -> None:
    """An unreadable adapter file (truncated, bit-flipped header, not safetensors) raises a `ValueError` that names
    the file, instead of safetensors' bare deserialization error. Only failures are translated; PEFT's loading is
    otherwise unchanged, for every method."""
    import functools

    from peft import peft_model

    original = peft_model.load_peft_weights
    if getattr(original, "_sparse_opd_patched", False):
        return

    @functools.wraps(original)
    def load_peft_weights(model_id, *args, **kwargs):
        folder = str(model_id)
        if os.path.isdir(folder) and not any(
            os.path.isfile(os.path.join(folder, kwargs.get("subfolder") or "", name))
            for name in ("adapter_model.safetensors", "adapter_model.bin")
        ):
            raise FileNotFoundError(f"{folder} has no adapter_model.safetensors: the adapter was not saved completely")
        try:
            return original(model_id, *args, **kwargs)
        except Exception as err:
            if type(err).__name__ != "SafetensorError":
                raise
            raise ValueError(f"{model_id}: adapter_model.safetensors is not a readable safetensors file ({err}); it is "
                             "truncated or corrupted: save or download it again") from None

    load_peft_weights._sparse_opd_patched = True
    peft_model.load_peft_weights = load_peft_weights
