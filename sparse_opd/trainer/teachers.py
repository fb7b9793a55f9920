"""Teacher-side helpers: the student's own base weights as a teacher, and privileged teacher prompts."""

from __future__ import annotations

import copy

from torch import nn

from .config import template_fields


class BaseWeightsTeacher(nn.Module):
    """The student's frozen base weights (its sparse-delta adapter disabled) presented as a teacher model.

    It owns no parameters: it refers to the student without registering it as a submodule, so `teacher.eval()` or
    moving the teacher never touches the student. `SparseOPDTrainer` runs it by calling the student's backbone inside
    `disable_adapter()`; calling it directly is an error.
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        if not hasattr(student, "disable_adapter"):
            raise TypeError(
                "the base-weights teacher needs a PeftModel student (it disables the adapter to get the base); got "
                f"{type(student).__name__}"
            )
        object.__setattr__(self, "student", student)  # not a submodule on purpose

    @property
    def config(self):
        return self.student.config

    def get_output_embeddings(self):
        return self.student.get_output_embeddings()

    def forward(self, *args, **kwargs):
        raise RuntimeError(
            "BaseWeightsTeacher is not called directly: SparseOPDTrainer runs the student's backbone with the adapter "
            "disabled"
        )


def build_teacher_prompt(example: dict, column: str | None, template: str | None):
    """The teacher's prompt for one row: the privileged column if present, else the template, else `None`.

    The result has the same format as `example["prompt"]`: a list of messages (the template rewrites the last user
    message's content) or a string.
    """
    if column is not None and column in example and example[column] is not None:
        teacher_prompt = example[column]
        if isinstance(teacher_prompt, list) != isinstance(example["prompt"], list):
            raise ValueError(
                f"the {column!r} column and the 'prompt' column must have the same format (both lists of chat "
                f"messages or both strings); got {type(teacher_prompt).__name__} and "
                f"{type(example['prompt']).__name__}"
            )
        return teacher_prompt
    if template is None:
        return None
    prompt = example["prompt"]
    missing = template_fields(template) - {"prompt"} - set(example)
    if missing:
        raise ValueError(
            f"teacher_prompt_template uses {sorted(missing)}, which the dataset does not have (columns: "
            f"{sorted(example)}); add the column(s) or change the template"
        )
    fields = {k: v for k, v in example.items() if k != "prompt"}
    if isinstance(prompt, str):
        return template.format(prompt=prompt, **fields)
    messages = copy.deepcopy(prompt)
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            message["content"] = template.format(prompt=message["content"], **fields)
            return messages
    raise ValueError(
        "teacher_prompt_template rewrites the last user message, but this prompt has no user message with text content"
    )
