"""sparse-opd: train, discover and analyze the sparse weight updates of on-policy distillation.

Importing this package registers the ``SPARSE_DELTA`` method with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` accept sparse-delta adapters. The trainer classes
(``OPDConfig``, ``OPDTrainer``, ``SparseOPDConfig``, ``SparseOPDTrainer``) load TRL on first use, so the tuner alone
never imports it.
"""

import logging


class _QuietOptionalKernel(logging.Filter):
    """bitsandbytes (imported by PEFT) logs a warning on CPUs with AVX512-BF16 when the optional `kernels` package is
    missing; it only means a slower 4-bit CPU kernel, so it is dropped. Every other bitsandbytes message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_QuietOptionalKernel())

from .masks import SparseMask
from .tuner import SparseDeltaConfig, SparseDeltaLayer, SparseDeltaModel, adapter_mask

__version__ = "0.1.0"

_TRAINER_NAMES = ("OPDConfig", "OPDTrainer", "SparseOPDConfig", "SparseOPDTrainer")

__all__ = ["OPDConfig", "OPDTrainer", "SparseDeltaConfig", "SparseDeltaLayer", "SparseDeltaModel", "SparseMask",
           "SparseOPDConfig", "SparseOPDTrainer", "__version__", "adapter_mask"]


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'sparse_opd' has no attribute {name!r}")
