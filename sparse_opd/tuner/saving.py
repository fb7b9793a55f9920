"""`save_pretrained` of a sparse-delta `PeftModel`: PEFT's own save, staged, checked, completed and committed.

PEFT writes the files into a staging folder (`atomic_save.save_atomically`); then, for each saved adapter, the
weights file is read back and checked exactly as a load would check it (so a NaN value, a value that overflows the
save dtype, or a tensor no loader accepts is refused and the previous adapter on disk is kept), and the staged
`adapter_config.json` gets what only the written file determines: `weights_digest` (which pairs the config with
these weights), `module_index_bytes`, and the fingerprint's `merge_probe`. The model card gets its loading section.
Only then does the save replace the previous files. The in-memory config is not modified.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..masks.sparse_mask import normalize_module_name
from .atomic_save import save_atomically
from .fingerprint import merge_probe
from .layer import SparseDeltaLayer
from .loading import STREAM, VALUES, adapter_digest, check_adapter_state
from .model_card import add_loading_section, embedded_base_note


def save_adapter(peft_model, peft_save, save_directory: str, **options) -> None:
    """Save ``peft_model``'s adapters into ``save_directory`` (see the module docstring); ``peft_save`` is PEFT's
    `PeftModel.save_pretrained`, ``options`` its keyword arguments."""
    selected = options.get("selected_adapters") or list(peft_model.peft_config)

    def write(staging: str) -> None:
        card = os.path.join(save_directory, "README.md")
        if os.path.isfile(card):  # PEFT updates an existing card (e.g. TRL's) rather than replacing it
            shutil.copy2(card, os.path.join(staging, "README.md"))
        peft_save(peft_model, staging, **options)
        for adapter in selected:
            complete_config(peft_model, adapter, staging if adapter == "default" else os.path.join(staging, adapter))
        add_loading_section(staging, peft_model.active_peft_config, embedded_base_note(peft_model))

    save_atomically(save_directory, write)


def _read_weights(folder: str) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, "adapter_model.safetensors")
    if os.path.isfile(path):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(os.path.join(folder, "adapter_model.bin"), map_location="cpu", weights_only=True)


def complete_config(peft_model, adapter_name: str, folder: str) -> None:
    """Check the staged weights of ``adapter_name`` in ``folder`` as a load would, and write what they determine into
    the staged config. A shard of a sharded checkpoint (ZeRO-3 saves empty partitions) is not an adapter that loads
    alone: it gets no digest, so loading it as one is refused."""
    config = peft_model.peft_config[adapter_name]
    state = _read_weights(folder)
    config_path = os.path.join(folder, "adapter_config.json")
    with open(config_path, encoding="utf-8") as f:
        saved = json.load(f)
    if any(key.endswith(VALUES) and tensor.numel() == 0 for key, tensor in state.items()):
        saved["weights_digest"] = None
    else:
        try:
            entries = check_adapter_state(peft_model, config, adapter_name, state, from_saved_config=False)
        except ValueError as err:
            raise ValueError(f"save_pretrained refused to write adapter {adapter_name!r}, which no loader would "
                             f"accept (the previous files are kept): {err}") from None
        saved["weights_digest"] = adapter_digest(entries)
        saved["module_index_bytes"] = {m: int(t.numel()) for (m, part), t in entries.items() if part == STREAM}
        if saved.get("base_model_fingerprint"):
            layers = {normalize_module_name(n): m for n, m in peft_model.named_modules()
                      if isinstance(m, SparseDeltaLayer) and adapter_name in m.sparse_delta_values}
            probe = merge_probe(layers, adapter_name, saved["base_model_fingerprint"].get("dtype"))
            saved["base_model_fingerprint"]["merge_probe"] = probe
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(saved, indent=2, sort_keys=True))
