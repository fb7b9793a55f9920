"""`save_pretrained` of a sparse-delta adapter replaces the files it overwrites atomically.

PEFT writes `adapter_model.safetensors`, `adapter_config.json` and `README.md` in place, one after the other: a kill
can leave an empty config, and a failure between the files leaves new weights beside an old config. Here PEFT saves
into a staging folder inside the target (same file system), each file is flushed to disk, then renamed over its old
version (`os.replace`, atomic), weights first. An exception while saving leaves the old adapter untouched; a kill in
the instant between two renames leaves a pair that `adapter_config.json`'s `weights_digest` rejects on load with a
clear error, never a silently mixed adapter.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile

_FIRST = (".safetensors", ".bin")  # weights before the config that describes them


def _flush(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _move_into(staging: str, target: str) -> None:
    files = []
    for root, _, names in os.walk(staging):
        files += [os.path.relpath(os.path.join(root, n), staging) for n in names]
    files.sort(key=lambda rel: (not rel.endswith(_FIRST), rel.endswith("adapter_config.json"), rel))
    for rel in files:
        _flush(os.path.join(staging, rel))
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(target, rel)) or target, exist_ok=True)
        os.replace(os.path.join(staging, rel), os.path.join(target, rel))


def patch_peft_save(is_sparse_delta) -> None:
    """Wrap `PeftModel.save_pretrained` for sparse-delta models only (other methods keep PEFT's behaviour)."""
    from peft import PeftModel

    original = PeftModel.save_pretrained
    if getattr(original, "_sparse_opd_patched", False):
        return

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        if not is_main_process or not is_sparse_delta(self) or os.path.isfile(save_directory):
            return original(self, save_directory, *args, is_main_process=is_main_process, **kwargs)
        os.makedirs(save_directory, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".sparse-delta-save-", dir=save_directory) as staging:
            card = os.path.join(save_directory, "README.md")
            if os.path.isfile(card):  # PEFT updates an existing card (e.g. TRL's) rather than replacing it
                shutil.copy2(card, os.path.join(staging, "README.md"))
            original(self, staging, *args, is_main_process=True, **kwargs)
            _move_into(staging, save_directory)

    save_pretrained._sparse_opd_patched = True
    PeftModel.save_pretrained = save_pretrained
