"""Deprecated module name: the embedded SmolLM2 cache is `sparse_opd.embedded`."""

import warnings

from .embedded import (  # noqa: F401
    EMBEDDED_MODEL_NAME,
    cache_dir,
    embedded_gguf_path,
    embedded_model_path,
    load_embedded_model,
    resolve_model_path,
)

warnings.warn("sparse_opd.models is now sparse_opd.embedded", FutureWarning, stacklevel=2)
