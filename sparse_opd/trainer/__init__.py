"""On-policy distillation into a sparse delta: `SparseOPDConfig` + `SparseOPDTrainer` (TRL's DistillationTrainer)."""

from .config import MASK_STRATEGIES, SparseOPDConfig
from .teachers import BaseWeightsTeacher, build_teacher_prompt
from .telemetry import UpdateNormCallback, sparse_delta_layers, sparse_delta_stats
from .trainer import DenseOPDTrainer, PrivilegedTeacherMixin, SparseOPDTrainer, is_sparse_delta_model

__all__ = [
    "MASK_STRATEGIES",
    "BaseWeightsTeacher",
    "DenseOPDTrainer",
    "PrivilegedTeacherMixin",
    "SparseOPDConfig",
    "SparseOPDTrainer",
    "UpdateNormCallback",
    "build_teacher_prompt",
    "is_sparse_delta_model",
    "sparse_delta_layers",
    "sparse_delta_stats",
]
