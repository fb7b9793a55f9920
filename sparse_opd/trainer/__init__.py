"""On-policy distillation into a sparse delta: `SparseOPDConfig` + `SparseOPDTrainer` (TRL's DistillationTrainer)."""

from ..tuner import sparse_delta_layers
from .config import MASK_STRATEGIES, SparseOPDConfig
from .opd_trainer import OPDTrainer
from .probe import ProbeCallback
from .privileged import PrivilegedTeacherMixin
from .sparse_opd_trainer import SparseOPDTrainer, is_sparse_delta_model
from .teachers import BaseWeightsTeacher, build_teacher_prompt
from .telemetry import UpdateNormCallback, sparse_delta_stats

__all__ = [
    "MASK_STRATEGIES",
    "BaseWeightsTeacher",
    "OPDTrainer",
    "PrivilegedTeacherMixin",
    "ProbeCallback",
    "SparseOPDConfig",
    "SparseOPDTrainer",
    "UpdateNormCallback",
    "build_teacher_prompt",
    "is_sparse_delta_model",
    "sparse_delta_layers",
    "sparse_delta_stats",
]
