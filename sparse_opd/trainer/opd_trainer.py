"""`OPDTrainer`: on-policy distillation of every weight, or of any PEFT adapter, with `SparseOPDTrainer`'s teachers."""

from __future__ import annotations

import copy

from peft import PeftConfig
from torch import nn
from trl import DistillationTrainer

from .config import SparseOPDConfig
from .privileged import PrivilegedTeacherMixin, check_teacher_context, load_student
from .rollout_check import RolloutCheckMixin
from .teachers import BaseWeightsTeacher


def _is_peft_model(model) -> bool:
    from accelerate.utils import is_peft_model

    return isinstance(model, nn.Module) and is_peft_model(model)


class OPDTrainer(RolloutCheckMixin, PrivilegedTeacherMixin, DistillationTrainer):
    """On-policy distillation of every weight (or of a LoRA / other PEFT adapter) with `SparseOPDTrainer`'s teachers.

    The baseline sparse OPD is measured against, and the way to make the full-OPD checkpoint that
    `mask_strategy="diff"` reads; the `"probe"` strategy runs it for a few steps. It takes a `SparseOPDConfig`
    (the mask fields are ignored) and the same teachers: a teacher model, or, without one, the student's own starting
    weights in the privileged context (a frozen copy for a dense student; the adapter disabled for a PEFT student).
    """

    _tag_names = ["trl", "distillation", "sparse-opd"]
    _name = "OPD"

    def __init__(self, model, teacher_model=None, args: SparseOPDConfig | None = None, train_dataset=None,
                 peft_config: PeftConfig | None = None, **kwargs):
        if args is None:
            args = SparseOPDConfig(output_dir="opd-output")
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        check_teacher_context(args, teacher_model, train_dataset)
        if teacher_model is None and peft_config is None and not _is_peft_model(model):
            if isinstance(model, str):
                model = load_student(model, args, kwargs.get("quantization_config"))
            teacher_model = copy.deepcopy(model).eval().requires_grad_(False)
            self._teacher_is_student_copy = True  # the student's starting weights: it reads the privileged context
        super().__init__(model=model, teacher_model=teacher_model, args=args, train_dataset=train_dataset,
                         peft_config=peft_config, **kwargs)
        if self.teacher_model is None:
            self.teacher_model = BaseWeightsTeacher(self.model)

