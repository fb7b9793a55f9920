"""The SparseDelta PEFT method: trainable values on fixed coordinates of frozen weights."""

from .registration import add_peft_type, register

add_peft_type()

from .config import SparseDeltaConfig  # noqa: E402
from .layer import Linear, SparseDeltaLayer  # noqa: E402
from .model import SparseDeltaModel  # noqa: E402

register(SparseDeltaConfig, SparseDeltaModel)

__all__ = ["Linear", "SparseDeltaConfig", "SparseDeltaLayer", "SparseDeltaModel"]
