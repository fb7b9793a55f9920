"""On-policy distillation: `OPDConfig` + `OPDTrainer` (TRL's DistillationTrainer with privileged-context teachers,
sampled from the policy it trains), and `SparseOPDConfig` + `SparseOPDTrainer`, which train a sparse delta."""

from ..tuner import sparse_delta_layers
from .config import MASK_STRATEGIES, OPDConfig, SparseOPDConfig
from .opd_trainer import OPDTrainer
from .privileged import PrivilegedTeacherMixin
from .probe import ProbeCallback
from .sparse_opd_trainer import SparseOPDTrainer, is_sparse_delta_model
from .teachers import BaseWeightsTeacher, build_teacher_prompt
from .telemetry import UpdateNormCallback, sparse_delta_stats

__all__ = [
    "MASK_STRATEGIES",
    "BaseWeightsTeacher",
    "OPDConfig",
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
