"""Which weights a mask may cover: one rule for every mask source (priors, probe, diff) and for the tuner.

By default: every linear layer (``nn.Linear``, transformers' ``Conv1D``, bitsandbytes' linear layers, or a layer
already wrapped by a PEFT adapter) except the model's output head, the layers PEFT's ``target_modules="all-linear"``
selects. With ``target_modules`` / ``exclude_modules``: PEFT's own matcher (a string is a regex over the full module
name; a list matches a name exactly or by its dotted suffix).

A checkpoint on disk is matched by the same rule: its ``config.json`` builds the model on the meta device (no memory),
and its module names select the tensors. A bare safetensors file without a config falls back to the names: 2-D
``*.weight`` tensors that are not embeddings or the head.
"""

from __future__ import annotations

import json
import os
import re
import types

import torch
from torch import nn

OUTPUT_HEADS = ("lm_head", "embed_out", "score", "classifier")
_EMBEDDING_NAME = re.compile(
    r"(^|\.)(embed_tokens|embed_positions|wte|wpe|word_embeddings|position_embeddings|shared)$")


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))  # bitsandbytes' Linear8bitLt / Linear4bit subclass nn.Linear


def _is_tuner_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def _matcher(target_modules, exclude_modules):
    """PEFT's `check_target_module_exists` on a stand-in config; `None` when every module counts."""
    if target_modules is None and not exclude_modules:
        return None
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    config = types.SimpleNamespace(
        target_modules=target_modules if target_modules is not None else ".*",
        exclude_modules=exclude_modules, modules_to_save=None, target_parameters=None, layers_to_transform=None,
        layers_pattern=None,
    )
    if isinstance(config.target_modules, (list, tuple)):
        config.target_modules = set(config.target_modules)

    def match(name: str) -> bool:
        found = check_target_module_exists(config, name)
        return bool(found) and not isinstance(found, _ExcludedModule)

    return match


def all_linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of ``model`` by name; inside a PEFT model the wrapper layer stands for its base layer (its
    name, never ``...base_layer``), so a second adapter sees the same names as the first."""
    found, inside = {}, []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        wrapped = _is_tuner_layer(module)
        if wrapped:
            inside.append(name + ".")
        if wrapped or _is_linear(module):
            found[name] = module
    return found


def linear_modules(model: nn.Module, target_modules=None, exclude_modules=None) -> dict[str, nn.Module]:
    """Module name -> module of the linear layers a mask may cover (see the module docstring)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    match = _matcher(target_modules, exclude_modules)
    found = {}
    for name, module in all_linear_modules(model).items():
        base = module.get_base_layer() if _is_tuner_layer(module) else module
        if target_modules is None and (base is head or module is head or name.split(".")[-1] in OUTPUT_HEADS):
            continue
        if match is None or match(name):
            found[name] = module
    if not found:
        raise ValueError(
            f"no linear layer matches target_modules={target_modules!r} (exclude_modules={exclude_modules!r}); "
            f"linear layers of this model include {_some_linear_names(model)}"
        )
    return found


def _some_linear_names(model: nn.Module, n: int = 4) -> list[str]:
    return [name for name, module in model.named_modules() if _is_linear(module)][:n]


def stored_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer (or of the base layer of a PEFT wrapper) as stored."""
    return (module.get_base_layer() if _is_tuner_layer(module) else module).weight


def stored_shape(module: nn.Module) -> tuple[int, int]:
    """The shape of a linear layer's weight as stored: ``(out, in)``, or ``(in, out)`` for transformers' ``Conv1D``.

    Read from the layer's attributes, so it is right for quantized (packed) and ZeRO-3-partitioned weights too.
    """
    from transformers.pytorch_utils import Conv1D

    base = module.get_base_layer() if _is_tuner_layer(module) else module
    if isinstance(base, Conv1D):
        return (base.nx, base.nf)
    return (base.out_features, base.in_features)


def checkpoint_targets(shapes: dict[str, tuple[int, ...]], source: str | os.PathLike | None = None,
                       target_modules=None, exclude_modules=None) -> list[str]:
    """Tensor names (``<module>.weight``) of a checkpoint that the rule selects; ``shapes``: tensor name -> shape.

    With a ``config.json`` beside the checkpoint the model is built on the meta device and `linear_modules` decides;
    otherwise 2-D ``*.weight`` tensors that are not embeddings or an output head are kept (then filtered by PEFT's
    matcher if ``target_modules`` / ``exclude_modules`` are given).
    """
    names = [n for n, shape in shapes.items() if n.endswith(".weight") and len(shape) == 2]
    model = _meta_model(source)
    if model is not None:
        modules = set(linear_modules(model, target_modules, exclude_modules))
        return [n for n in names if n.removesuffix(".weight") in modules]
    match = _matcher(target_modules, exclude_modules)
    kept = []
    for name in names:
        module = name.removesuffix(".weight")
        if target_modules is None and (module.split(".")[-1] in OUTPUT_HEADS or _EMBEDDING_NAME.search(module)):
            continue
        if match is None or match(module):
            kept.append(name)
    return kept


def _meta_model(source) -> nn.Module | None:
    """The checkpoint's model built on the meta device from its config.json, or None (no config, unknown class)."""
    if source is None:
        return None
    folder = str(source) if os.path.isdir(str(source)) else os.path.dirname(str(source))
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            json.load(f)
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging

        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            config = AutoConfig.from_pretrained(folder)
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config)
        finally:
            logging.set_verbosity(verbosity)
    except Exception:  # noqa: BLE001 (an architecture transformers cannot build, e.g. remote code: names only)
        return None
