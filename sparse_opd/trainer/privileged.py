"""Privileged-context teachers for any `DistillationTrainer`: the teacher scores the student's completions after its
own prompt (worked examples, the reference solution, ...), and may be the student's own base weights."""

from __future__ import annotations

import contextlib

import torch
from trl.trainer.utils import create_model_from_path, pad

from .config import OPDConfig, template_fields
from .teachers import BaseWeightsTeacher, build_teacher_prompt

_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def check_teacher_context(args, teacher_model, dataset) -> None:
    """Refuse a run without a teacher: no teacher model and no privileged context would distill the student into
    itself. Also checks that a `teacher_prompt_template`'s fields are columns of the dataset."""
    if isinstance(dataset, dict):  # several eval sets: check the first
        dataset = next(iter(dataset.values()), None)
    has_context = args.teacher_prompt_template is not None
    columns = getattr(dataset, "column_names", None)
    if columns is not None:
        has_context = has_context or (
            args.teacher_prompt_column is not None and args.teacher_prompt_column in columns
        )
        if args.teacher_prompt_template is not None:
            missing = template_fields(args.teacher_prompt_template) - {"prompt"} - set(columns)
            if missing:
                raise ValueError(
                    f"teacher_prompt_template uses {sorted(missing)}, which the dataset lacks (columns: "
                    f"{columns}); add the column(s) or change the template"
                )
    elif dataset is not None:  # iterable dataset without known columns: trust the first row at run time
        has_context = has_context or args.teacher_prompt_column is not None
    if teacher_model is not None and args.teacher_privileged_context and not has_context:
        raise ValueError(
            "teacher_privileged_context=True, but the data has no privileged context for the teacher: add a "
            f"{args.teacher_prompt_column!r} column or set teacher_prompt_template"
        )
    if teacher_model is None and args.teacher_privileged_context is False:
        raise ValueError(
            "teacher_privileged_context=False with no teacher model: the student's own base weights would be the "
            "teacher with the student's own prompt, i.e. the student itself. Pass a teacher model, or let the base "
            "weights read the privileged context"
        )
    if teacher_model is None and not has_context:
        raise ValueError(
            "no teacher: pass teacher_model (or args.teacher_model_name_or_path), or give the student's own base "
            f"weights a privileged context: a {args.teacher_prompt_column!r} column in the dataset "
            "(args.teacher_prompt_column) or args.teacher_prompt_template. Without one the teacher would be the "
            "student itself."
        )


def load_student(model_id: str, args: OPDConfig, quantization_config):
    """The student from a model id or path, loaded the way `DistillationTrainer` would (its init kwargs)."""
    kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(model_id, **kwargs)


@contextlib.contextmanager
def _eval_mode(model):
    """A teacher pass runs in eval mode (no dropout): deterministic, whatever mode the student trains in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class PrivilegedTeacherMixin:
    """Lets a `DistillationTrainer`'s teacher score the student's completions after its own (privileged) prompt.

    Mixed in before `ScoringMixin` and `DistillationTrainer`, whose `scored_batch` it reads. The teacher prompt of
    each row comes from `args.teacher_prompt_column` or `args.teacher_prompt_template` (see `OPDConfig`); a
    `BaseWeightsTeacher` runs the student with its adapter disabled.
    """

    # data -----------------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = []
        if self.args.teacher_prompt_column is not None:
            extra.append(self.args.teacher_prompt_column)
        if self.args.teacher_prompt_template is not None:
            extra += sorted(template_fields(self.args.teacher_prompt_template) - {"prompt"})
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    def _teacher_reads_privileged_context(self) -> bool:
        if self.args.teacher_privileged_context is not None:
            return self.args.teacher_privileged_context
        return isinstance(self.teacher_model, BaseWeightsTeacher) or getattr(self, "_teacher_is_student_copy", False)

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if not self._teacher_reads_privileged_context():
            return output  # a separate teacher reads the student's prompt: standard on-policy distillation
        teacher_prompts = [
            build_teacher_prompt(x, self.args.teacher_prompt_column, self.args.teacher_prompt_template) for x in inputs
        ]
        given = [p is not None for p in teacher_prompts]
        if not any(given):
            if isinstance(self.teacher_model, BaseWeightsTeacher):
                raise ValueError(
                    "the teacher is the student's base weights but this batch has no privileged context: every row "
                    f"needs a {self.args.teacher_prompt_column!r} value (or set teacher_prompt_template)"
                )
            return output
        if not all(given):
            raise ValueError(
                f"some rows have a teacher prompt and some do not ({sum(given)}/{len(given)} in this batch); give "
                f"every row a {self.args.teacher_prompt_column!r} value"
            )
        if any(key in output for key in _MULTIMODAL_KEYS):
            raise ValueError("a privileged teacher prompt is not supported with multimodal inputs")
        device = self.accelerator.device
        ids, _, _ = self._tokenize_prompts(teacher_prompts)
        ids = [torch.tensor(x) for x in ids]
        output["teacher_prompt_ids"] = pad(
            ids,
            padding_value=self._tokenizer.pad_token_id,
            padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)
        output["teacher_prompt_mask"] = pad(
            [torch.ones_like(x) for x in ids],
            padding_value=0,
            padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)
        return output

    # loss -----------------------------------------------------------------------------------------------------------
    def _get_last_hidden_state(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs):
        if unwrapped_model is not self.accelerator.unwrap_model(self.teacher_model):
            return super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)
        batch = self.scored_batch  # the micro-batch `_compute_loss` is scoring (`ScoringMixin`)
        if batch is not None and "teacher_prompt_ids" in batch:
            # Same completion tokens, right-padded alike, so the last `logits_to_keep` positions line up with the
            # student's; only the prompt in front of them differs. `ScoringMixin` numbers the positions from the
            # teacher prompt's own first token, as if the teacher had generated the completion after it.
            input_ids = torch.cat([batch["teacher_prompt_ids"], batch["completion_ids"]], dim=1)
            attention_mask = torch.cat([batch["teacher_prompt_mask"], batch["completion_mask"]], dim=1)
        if isinstance(unwrapped_model, BaseWeightsTeacher):
            student = unwrapped_model.student
            with student.disable_adapter(), _eval_mode(student):
                return super()._get_last_hidden_state(student, input_ids, attention_mask, logits_to_keep, **kwargs)
        with _eval_mode(unwrapped_model):
            return super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)
