"""Persistent storage of a layer's coordinates as encoded index streams.

The adapter file stores each module's indices as one compact ``uint8`` stream (see `sparse_opd.masks.encoding`).
Keeping that stream as the layer's persistent buffer means every loader that fills buffers by name and shape (PEFT's
``load_state_dict`` and transformers' own ``load_adapter``) writes it without knowing the format. This dict notices
either kind of write and has the layer decode the stream into its int64 ``sparse_delta_indices``.
"""

from __future__ import annotations

import weakref

import torch
from peft.tuners._buffer_dict import BufferDict


class IndexStreamDict(BufferDict):
    def __init__(self, owner) -> None:
        super().__init__({}, persistent=True)
        object.__setattr__(self, "_owner", weakref.ref(owner))

    def set_encoded(self, adapter_name: str, stream: torch.Tensor) -> None:
        """Store a stream that the layer already decoded (no callback)."""
        self.register_buffer(adapter_name, stream, persistent=True)

    def __setattr__(self, name, value):
        loaded = isinstance(value, torch.Tensor) and name in self.__dict__.get("_buffers", {})
        super().__setattr__(name, value)
        if loaded:  # transformers' loader assigns buffers by attribute
            self._owner()._on_index_stream_loaded(name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        present = [name for name in self._buffers if prefix + name in state_dict]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name in present:  # PEFT's loader copies into the buffer in place
            self._owner()._on_index_stream_loaded(name)
