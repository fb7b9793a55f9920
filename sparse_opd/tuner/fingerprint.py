"""A fingerprint of the base weights an adapter was trained on, so that loading onto another base fails loudly.

Stored in ``adapter_config.json`` as ``base_model_fingerprint``:

- ``shapes``: a digest of the adapted weights' names and shapes;
- ``samples``: 4 entries per weight at fixed pseudo-random positions (float32, base64) and the ``dtype`` they were
  read in. Loading compares them within one rounding step of the coarser of the recorded and the loaded dtype, so the
  same checkpoint loaded in fp32, bf16 or fp16 matches while other weights do not;
- ``merge_probe`` (written when saving a trained adapter): up to 8 coordinates where the delta is most visible, with
  the base entry ``W`` and the merged ``W + delta``. A base that holds ``W + delta`` there is the adapter's own merged
  checkpoint, on which loading the adapter would apply the delta twice.

Quantized bases compare shapes only. ZeRO-3 / FSDP2 weights are gathered one at a time to read them.
"""

from __future__ import annotations

import base64
import hashlib
import math

import numpy as np
import torch

from ..distributed import gathered, is_sharded

FORMAT = 2
_SAMPLES = 4
_PROBES = 8
_MANTISSA = {torch.float32: 23, torch.float64: 52, torch.bfloat16: 7, torch.float16: 10}
_MIN_NORMAL = {torch.float32: 2.0**-126, torch.float64: 2.0**-1022, torch.bfloat16: 2.0**-126, torch.float16: 2.0**-14}


def check_fingerprint_format(fingerprint) -> None:
    """Raise a `ValueError` naming the part of a stored ``base_model_fingerprint`` that has the wrong form."""
    name = "base_model_fingerprint"
    if not isinstance(fingerprint, dict):
        raise ValueError(  # a value read from a file: corrupted data (ValueError), not a wrong argument type
            f"{name} in adapter_config.json must be an object with shapes, samples and dtype, got "
            f"{type(fingerprint).__name__}: the config is corrupted or was edited by hand")
    dtypes = {str(d).removeprefix("torch.") for d in _MANTISSA}
    for key, ok in (("shapes", lambda v: isinstance(v, str)), ("samples", lambda v: v is None or isinstance(v, str)),
                    ("dtype", lambda v: v is None or v in dtypes),
                    ("format", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)))):
        if not ok(fingerprint.get(key)):
            raise ValueError(f"{name}.{key} in adapter_config.json has the wrong form ({fingerprint.get(key)!r:.60}): "
                             "the config is corrupted or was edited by hand")
    probe = fingerprint.get("merge_probe")
    if probe is None:
        return
    if not isinstance(probe, list) or len(probe) > _PROBES or not all(_probe_entry(e) for e in probe):
        raise ValueError(f"{name}.merge_probe in adapter_config.json must be a list of at most {_PROBES} "
                         "[module, index, W, W + delta] entries: the config is corrupted or was edited by hand")


def _probe_entry(entry) -> bool:
    return (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)
            and isinstance(entry[1], int) and not isinstance(entry[1], bool) and entry[1] >= 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in entry[2:]))


def _sample_positions(numel: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(numel % (2**31))
    return torch.randint(0, numel, (min(_SAMPLES, numel),), generator=gen)


def _coarsest(dtypes) -> torch.dtype:
    return min(dtypes, key=lambda d: _MANTISSA.get(d, 52), default=torch.float32)


def rounding_step(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The spacing of ``dtype`` numbers at ``|values|`` (subnormal spacing below the smallest normal number)."""
    mantissa, normal = _MANTISSA.get(dtype, 52), _MIN_NORMAL.get(dtype, 2.0**-1022)
    magnitude = np.maximum(np.abs(values.astype(np.float64)), normal)
    return np.exp2(np.floor(np.log2(magnitude)) - mantissa)


def _encode(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def _decode(text: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise ValueError("base_model_fingerprint in adapter_config.json is not valid base64: the config is corrupted "
                         "or was edited by hand") from None
    if len(raw) % 4:
        raise ValueError("base_model_fingerprint in adapter_config.json has a truncated sample list")
    return np.frombuffer(raw, dtype="<f4").astype(np.float64)


def _read(weight: torch.Tensor, positions: torch.Tensor) -> list[float]:
    with gathered([weight]) as (full,):
        flat = full.detach().reshape(-1)
        return flat[positions.to(flat.device)].float().cpu().tolist()


def compute_fingerprint(layers: dict[str, tuple[tuple[int, int], torch.Tensor | None]]) -> dict:
    """``layers``: module name -> (stored shape, plain weight tensor or None for a quantized weight)."""
    shapes, samples, dtypes = hashlib.sha256(), [], set()
    comparable = True
    for name in sorted(layers):
        shape, weight = layers[name]
        shapes.update(f"{name}:{tuple(shape)};".encode())
        if weight is None or weight.device.type == "meta":
            comparable = False
            continue
        samples += _read(weight, _sample_positions(math.prod(shape)))
        dtypes.add(weight.dtype)
    out = {"format": FORMAT, "shapes": shapes.hexdigest()[:16], "samples": None, "dtype": None}
    if comparable:
        out.update(samples=_encode(samples), dtype=str(_coarsest(dtypes)).removeprefix("torch."))
    return out


def check_fingerprint(expected: dict, layers: dict, adapter_name: str) -> None:
    """Raise a `ValueError` if ``layers`` (as for `compute_fingerprint`) are not the base ``expected`` describes."""
    actual = compute_fingerprint(layers)
    if expected.get("shapes") != actual["shapes"]:
        raise ValueError(
            f"adapter {adapter_name!r} was made for a base model with other adapted weights or shapes "
            f"(fingerprint {expected.get('shapes')} != {actual['shapes']}); load it onto the base model it was "
            "trained from (see base_model_name_or_path in adapter_config.json)"
        )
    if actual["samples"] is None:
        return  # a quantized base cannot be compared entry by entry; the shapes matched
    _check_merge_probe(expected.get("merge_probe"), layers, expected.get("dtype"), adapter_name)
    if expected.get("samples") is not None:
        recorded, loaded = _decode(expected["samples"]), _decode(actual["samples"])
        dtype = _coarsest({_dtype(expected.get("dtype")), _dtype(actual["dtype"])})
        if recorded.shape != loaded.shape or not _close(loaded, recorded, dtype).all():
            raise ValueError(
                f"adapter {adapter_name!r} was made for a base model with the same shapes but different weights: a "
                "sparse delta is only meaningful on its own base checkpoint. Load the matching base model, or pass "
                "a config with base_model_fingerprint=None to skip this check knowingly."
            )


def _dtype(name: str | None) -> torch.dtype:
    return getattr(torch, name or "float32", torch.float32)


def _close(a: np.ndarray, b: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    return np.abs(a - b) <= rounding_step(np.maximum(np.abs(a), np.abs(b)), dtype)


def _check_merge_probe(probe, layers: dict, recorded_dtype: str | None, adapter_name: str) -> None:
    if not probe:
        return
    base_like = merged_like = 0
    for module, index, w, merged in probe:
        shape, weight = layers.get(module, (None, None))
        if weight is None or not 0 <= index < math.prod(shape):
            continue
        u = np.asarray(_read(weight, torch.tensor([index])))
        dtype = _coarsest({_dtype(recorded_dtype), weight.dtype})
        if _close(u, np.asarray([w]), dtype).all():
            base_like += 1
        elif _close(u, np.asarray([merged]), dtype).all():
            merged_like += 1
    if merged_like > base_like:
        raise ValueError(
            f"the base model already contains adapter {adapter_name!r}'s delta ({merged_like} of {len(probe)} probed "
            "coordinates hold W + delta): it is the adapter's own merged checkpoint, and loading the adapter would "
            "apply the delta twice. Load the adapter onto the original base model, or use the merged model as is"
        )


def base_entries(layer, adapter_name: str) -> torch.Tensor:
    """The base weight's entries at ``adapter_name``'s coordinates as they are with no adapter merged: where merged
    adapters overlap them, their saved originals, restored in the reverse order of merging (as unmerge does)."""
    weight = layer.get_base_layer().weight.detach().reshape(-1)
    indices = layer.sparse_delta_indices[adapter_name].to(weight.device)
    entries = weight[indices].clone()
    for merged in reversed(layer.merged_adapters):
        backup = layer._merge_backup.get(merged)
        if backup is None:
            continue
        others = layer.sparse_delta_indices[merged].to(weight.device)
        pos = torch.searchsorted(others, indices).clamp(max=others.numel() - 1)
        hit = others[pos] == indices
        entries[hit] = backup.to(entries.device)[pos[hit]]
    return entries


def merge_probe(layers: dict, adapter_name: str, dtype: str | None) -> list | None:
    """Up to 8 ``[module, flat index, W, W + delta]`` where the trained delta is most visible in ``dtype`` (the
    base's), read from unsharded plain weights (the unmerged base entries, also while adapters are merged); None when
    none can be read or the delta is still zero."""
    candidates = []
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        values = layer.sparse_delta_values[adapter_name].detach()
        if layer.quantized or is_sharded(weight) or is_sharded(values) or weight.device.type == "meta":
            return None
        indices = layer.sparse_delta_indices[adapter_name]
        w = base_entries(layer, adapter_name).double().cpu()
        merged = (w + values.double().cpu()).to(weight.dtype).double()
        visible = (merged - w).abs() / torch.from_numpy(rounding_step(w.numpy(), weight.dtype))
        top = torch.topk(visible, min(_PROBES, visible.numel()))
        for score, pos in zip(top.values.tolist(), top.indices.tolist()):
            if score >= 2:  # two rounding steps: W and W + delta cannot be confused within one
                candidates.append((score, [name, int(indices[pos]), float(w[pos]), float(merged[pos])]))
    candidates.sort(key=lambda c: -c[0])
    return [entry for _, entry in candidates[:_PROBES]] or None
