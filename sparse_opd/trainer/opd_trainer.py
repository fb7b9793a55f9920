"""`OPDTrainer`: TRL's on-policy distillation with privileged-context teachers, sampled from the policy it trains.

What it changes in `trl.DistillationTrainer` (every override calls `super()`), and where:
- `__init__`: without a teacher model, the student's starting weights are the teacher; dropout off (`OPDConfig`).
- `_set_signature_columns_if_needed`: keeps the columns the teacher's prompt is built from (`PrivilegedTeacherMixin`).
- `_generate_and_score_completions`: adds the teacher's privileged prompt ids to the batch (`PrivilegedTeacherMixin`);
  generates inside `_generation_context()` while recording the sampled tokens' log-probabilities, from transformers'
  `generate` or TRL's `VLLMGeneration.generate` (`RolloutCheckMixin`).
- `_compute_loss`: makes the micro-batch visible to the hidden-state overrides for its duration (`ScoringMixin`).
- `_get_last_hidden_state`: every forward scores the completion at the positions `generate()` gave it
  (`ScoringMixin`); the teacher reads its own prompt before the same completion tokens, in eval mode, and the
  base-weights teacher runs the student with the adapter disabled (`PrivilegedTeacherMixin`); the student's hidden
  states give the training log-probabilities of the sampled tokens (`RolloutCheckMixin`).
- `log`: the rollout gap over the logging window, as a token-weighted mean and a true maximum (`RolloutCheckMixin`).
Generation, the generalized JSD loss, gradient accumulation, checkpoints, resume, hub pushes, vLLM and distributed
training are `DistillationTrainer`'s own. `tests/trainer/test_trl_contract.py` pins the TRL members these overrides
rely on.
"""

from __future__ import annotations

import copy
from typing import ClassVar

from peft import PeftConfig
from torch import nn
from trl import DistillationTrainer

from .config import OPDConfig
from .privileged import PrivilegedTeacherMixin, check_teacher_context, load_student
from .rollout_check import RolloutCheckMixin
from .scoring import ScoringMixin
from .teachers import BaseWeightsTeacher


def _is_peft_model(model) -> bool:
    from accelerate.utils import is_peft_model

    return isinstance(model, nn.Module) and is_peft_model(model)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere in `model`: every `nn.Dropout` and every float rate named `*dropout*` that a layer keeps
    as an attribute (Llama's and Qwen's attention read `self.attention_dropout` in train mode; TRL's
    `disable_dropout_in_model` sees only `nn.Dropout`)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if "dropout" in name and type(value) is float and value > 0:
                setattr(module, name, 0.0)


def _checked_args(args, config_class, default_dir: str):
    if args is None:
        return config_class(output_dir=default_dir)
    if not isinstance(args, config_class):
        raise TypeError(
            f"args must be a {config_class.__name__}, got {type(args).__name__}; build one with "
            f"{config_class.__name__}(**your_config.to_dict()) or pass the same fields to {config_class.__name__}"
        )
    return args


class OPDTrainer(RolloutCheckMixin, PrivilegedTeacherMixin, ScoringMixin, DistillationTrainer):
    """On-policy distillation of every weight, or of any PEFT adapter (LoRA, ...), with privileged-context teachers.

    TRL's [`~trl.DistillationTrainer`], with what [`OPDConfig`] adds: the teacher may score the student's completions
    after its own, privileged prompt (the reference solution, worked examples, ...), or be the student's own starting
    weights (on-policy context distillation); every teacher pass runs in eval mode; the student's dropout is off and
    the log-probabilities of the sampled tokens under generation and under the training forward are compared at every
    step (`rollout/logp_abs_diff`). It is the baseline a sparse delta ([`SparseOPDTrainer`]) is measured against, the
    way to make the full-OPD checkpoint that `mask_strategy="diff"` reads, and what `mask_strategy="probe"` runs.

    Args:
        model (`str`, [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The student, as [`~trl.DistillationTrainer`] takes it (an id or path is loaded with
            `args.model_init_kwargs`).
        teacher_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            A separate teacher with the student's vocabulary, or `args.teacher_model_name_or_path`. If neither is
            given, the teacher is the student's starting weights: a frozen copy for a dense student, the student with
            its adapter disabled for a PEFT student (or with `peft_config`). It then reads the privileged context,
            which the data must provide (`args.teacher_prompt_column` or `args.teacher_prompt_template`).
        args ([`OPDConfig`], *optional*):
            Configuration; `OPDConfig(output_dir="opd-output")` if `None`.
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            A `prompt` column (conversational or text) and, for context distillation, the teacher prompt column or
            the columns the template names.
        eval_dataset, processing_class, callbacks, optimizers, quantization_config, peft_config, tools:
            As in [`~trl.DistillationTrainer`].

    Example:

    ```python
    >>> from peft import LoraConfig
    >>> from sparse_opd.tasks import arithmetic_dataset
    >>> from sparse_opd.trainer import OPDConfig, OPDTrainer

    >>> args = OPDConfig(output_dir="lora-opd", learning_rate=2e-4, max_steps=4, max_completion_length=32)
    >>> trainer = OPDTrainer(model="HuggingFaceTB/SmolLM2-135M-Instruct", args=args,
    ...                      train_dataset=arithmetic_dataset("train", 64, level=1),
    ...                      peft_config=LoraConfig(r=8, target_modules="all-linear"))
    >>> trainer.train()
    ```
    """

    _tag_names: ClassVar[list[str]] = ["trl", "distillation", "sparse-opd"]
    _name = "OPD"
    _config_class = OPDConfig
    _default_output_dir = "opd-output"

    def __init__(
        self,
        model,
        teacher_model=None,
        args: OPDConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config: PeftConfig | None = None,
        tools=None,
    ):
        args = _checked_args(args, self._config_class, self._default_output_dir)
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        check_teacher_context(args, teacher_model, train_dataset if train_dataset is not None else eval_dataset)
        model, teacher_model, peft_config = self._prepare_models(
            model, teacher_model, args, train_dataset, processing_class, quantization_config, peft_config
        )
        super().__init__(
            model=model,
            teacher_model=teacher_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
        )
        if args.disable_dropout:
            disable_dropout(self.model)  # TRL's own pass turned off nn.Dropout; this also zeroes float rates
        if self.teacher_model is None:
            # Not prepared by the accelerator: it has no parameters of its own and runs the (prepared) student.
            self.teacher_model = BaseWeightsTeacher(self.model)

    def _prepare_models(self, model, teacher_model, args, train_dataset, processing_class, quantization_config,
                        peft_config):
        """``(model, teacher_model, peft_config)`` for `DistillationTrainer`, after the arguments are checked. Here:
        a full-weights run without a teacher distills from a frozen copy of the student's starting weights, which
        reads the privileged context; `SparseOPDTrainer` builds its adapter instead."""
        if teacher_model is None and peft_config is None and not _is_peft_model(model):
            if isinstance(model, str):
                model = load_student(model, args, quantization_config)
            teacher_model = copy.deepcopy(model).eval().requires_grad_(False)
            self._teacher_is_student_copy = True  # the student's starting weights: it reads the privileged context
        return model, teacher_model, peft_config
