"""sparse-opd: train, discover and analyze the sparse weight updates of on-policy distillation.

Importing this package registers the ``SPARSE_DELTA`` method with PEFT, so ``get_peft_model``,
``PeftModel.from_pretrained`` and ``AutoPeftModelForCausalLM`` accept sparse-delta adapters.
"""

from .masks import SparseMask
from .tuner import SparseDeltaConfig, SparseDeltaLayer, SparseDeltaModel

__version__ = "0.1.0"

__all__ = ["SparseDeltaConfig", "SparseDeltaLayer", "SparseDeltaModel", "SparseMask", "__version__"]
