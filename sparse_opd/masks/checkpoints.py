"""Read safetensors checkpoints tensor by tensor: a file, a (sharded) directory, or a Hub id."""

from __future__ import annotations

import glob
import json
import os
import re

import torch
from safetensors import safe_open

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def checkpoint_files(source: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint: a file, a local directory (sharded or not) or a Hub model id."""
    source = str(source)
    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        if not _HUB_ID.match(source):
            raise FileNotFoundError(f"checkpoint {source} does not exist (neither a local path nor a Hub model id)")
        from huggingface_hub import snapshot_download

        source = snapshot_download(source, allow_patterns=["*.safetensors", "*.json"])
    index = os.path.join(source, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(source, s) for s in shards]
    files = sorted(glob.glob(os.path.join(source, "*.safetensors")))
    files = [f for f in files if not os.path.basename(f).startswith("adapter_model")]
    if not files:
        raise FileNotFoundError(f"{source} holds no *.safetensors checkpoint (a .bin checkpoint must be converted)")
    return files


class CheckpointReader:
    """Maps tensor names to shards and loads one tensor at a time (memory-mapped, nothing else resident)."""

    def __init__(self, source: str | os.PathLike):
        self.source = str(source)
        self._location: dict[str, str] = {}
        for path in checkpoint_files(source):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    self._location[name] = path
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self._location)

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def _handle(self, name: str):
        path = self._location[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)
