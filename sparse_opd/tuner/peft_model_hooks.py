"""`PeftModel.save_pretrained` and `PeftModel.push_to_hub`, extended for sparse-delta models only.

PeftModel calls no hook of its tuner while it writes files, so a crash-safe save (`saving.save_adapter`) and a push
that keeps the adapter's card (`model_card.push_adapter_to_hub`) need PeftModel's own methods. Each replacement
starts by handing every model whose tuner is not a `SparseDeltaModel` to PEFT's original method, unchanged and with
the same arguments: LoRA and every other method save and push exactly as with PEFT alone
(`tests/tuner/test_registration.py::test_lora_loads_saves_and_pushes_as_with_peft_alone`). Loading needs no hook: PEFT
reads a sparse-delta config through `SparseDeltaConfig.from_pretrained` and checks its tensors through the tuner's
`_remap_adapter_state_dict_for_load`.
"""

from __future__ import annotations

import functools
import inspect
import os


def is_sparse_delta(peft_model) -> bool:
    from .model import SparseDeltaModel

    return isinstance(getattr(peft_model, "base_model", None), SparseDeltaModel)


def install() -> None:
    """Extend `PeftModel.save_pretrained` and `push_to_hub` for sparse-delta models (idempotent)."""
    from peft import PeftModel

    peft_save, peft_push = PeftModel.save_pretrained, PeftModel.push_to_hub
    if getattr(peft_save, "_sparse_delta", False):
        return
    signature = inspect.signature(peft_save)

    @functools.wraps(peft_save)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not is_sparse_delta(self):
            return peft_save(self, save_directory, *args, **kwargs)
        from .saving import save_adapter

        arguments = signature.bind(self, save_directory, *args, **kwargs).arguments
        options = {k: v for k, v in arguments.items() if k not in ("self", "save_directory", "kwargs")}
        options.update(arguments.get("kwargs", {}))
        if not options.get("is_main_process", True) or os.path.isfile(save_directory):
            return peft_save(self, save_directory, *args, **kwargs)  # writes nothing, or raises PEFT's error
        embeddings = options.get("save_embedding_layers", "auto")
        if embeddings is True:
            raise ValueError("save_embedding_layers=True: a sparse-delta adapter holds no embedding layers; to train "
                             "and save them, list them in SparseDeltaConfig(modules_to_save=[...])")
        # PEFT's "auto" adds the embeddings when the base's Hub config has another vocabulary size; they are not part
        # of a sparse-delta adapter, and the file check would refuse them as foreign tensors
        options["save_embedding_layers"] = False
        return save_adapter(self, peft_save, save_directory, **options)

    @functools.wraps(peft_push)
    def push_to_hub(self, repo_id, *args, **kwargs):
        if not is_sparse_delta(self):
            return peft_push(self, repo_id, *args, **kwargs)
        from .model_card import push_adapter_to_hub

        return push_adapter_to_hub(self, repo_id, *args, **kwargs)

    save_pretrained._sparse_delta = push_to_hub._sparse_delta = True
    PeftModel.save_pretrained, PeftModel.push_to_hub = save_pretrained, push_to_hub
