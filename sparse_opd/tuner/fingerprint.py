"""A digest of the base weights an adapter was trained on, so loading onto another base fails loudly.

Two digests: ``shapes`` (names and shapes of the adapted weights) and ``values`` (64 entries per weight at fixed
pseudo-random positions, rounded to bfloat16 so that the same checkpoint loaded in fp32, bf16 or fp16 agrees).
If any adapted weight is quantized, only the shapes are compared.
"""

from __future__ import annotations

import hashlib

import torch

_SAMPLES = 64


def _sample_positions(numel: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(numel % (2**31))
    return torch.randint(0, numel, (min(_SAMPLES, numel),), generator=gen)


def compute_fingerprint(layers: dict[str, tuple[tuple[int, int], torch.Tensor | None]]) -> dict[str, str]:
    """``layers``: module name -> (stored shape, plain weight tensor or None for a quantized weight)."""
    shapes, values = hashlib.sha256(), hashlib.sha256()
    comparable = True
    for name in sorted(layers):
        shape, weight = layers[name]
        shapes.update(f"{name}:{tuple(shape)};".encode())
        if weight is None or weight.device.type == "meta":
            comparable = False
            continue
        flat = weight.detach().reshape(-1)
        sample = flat[_sample_positions(flat.numel()).to(flat.device)].float().to(torch.bfloat16)
        values.update(name.encode())
        values.update(sample.view(torch.int16).cpu().numpy().tobytes())
    return {"shapes": shapes.hexdigest()[:16], "values": values.hexdigest()[:16] if comparable else None}


def check_fingerprint(expected: dict[str, str], actual: dict[str, str], adapter_name: str) -> None:
    if expected.get("shapes") != actual["shapes"]:
        raise ValueError(
            f"adapter {adapter_name!r} was made for a base model with other adapted weights or shapes "
            f"(fingerprint {expected.get('shapes')} != {actual['shapes']}); load it onto the base model it was "
            "trained from (see base_model_name_or_path in adapter_config.json)"
        )
    if expected.get("values") is None or actual["values"] is None:
        return  # a quantized base cannot be compared entry by entry; the shapes matched
    if expected["values"] != actual["values"]:
        raise ValueError(
            f"adapter {adapter_name!r} was made for a base model with the same shapes but different weights "
            f"(fingerprint {expected.get('values')} != {actual['values']}): a sparse delta is only meaningful on "
            "its own base checkpoint. Load the matching base model, or pass a config with "
            "base_model_fingerprint=None to skip this check knowingly."
        )
