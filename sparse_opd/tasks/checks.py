"""Plain-language checks around a distillation run: before it, whether the teacher can teach; after it, whether the
student got worse.

Distillation moves the student toward the teacher, so it cannot help when the teacher is no better than the student
on the held-out rows, and a teacher shown only final answers learns little about how to reach them (its privileged
context gives away the result, not the working). After training, a score that fell by more than `z` paired standard
errors is a loss, not noise, and is said so in one line.
"""

from __future__ import annotations

import math

from .divergence import DivergenceResult
from .evaluation import EvalResult


def _paired(after: EvalResult, before: EvalResult) -> tuple[float, float]:
    if after.correct and before.correct:
        return after.gain_over(before)
    return after.accuracy - before.accuracy, math.hypot(after.stderr, before.stderr)  # unpaired, when no per-example


def _points(result: EvalResult, value: float) -> str:
    return f"{100 * value:.1f}%" if result.metric == "math_accuracy" else f"{value:.4g}"


def teacher_warnings(student: EvalResult, teacher: EvalResult, dataset=None, privileged: bool = True,
                     z: float = 2.0) -> list[str]:
    """One line per reason distillation may not help, before training (empty when none).

    Args:
        student, teacher: their scores on the same held-out rows, the teacher shown what it is shown in training.
        dataset: the training data; with `privileged`, its `worked_solution` column says whether the teacher's context
            holds working or only final answers.
        privileged: whether the teacher reads a privileged context (`teacher_prompt`).
        z: the teacher must beat the student by more than `z` paired standard errors.
    """
    lines = []
    gain, se = _paired(teacher, student)
    if not gain > z * se:
        unit = " points" if teacher.metric == "math_accuracy" else ""
        scale = 100 if teacher.metric == "math_accuracy" else 1
        lines.append(
            f"warning: the teacher is not clearly better than the student ({_points(teacher, teacher.accuracy)} vs "
            f"{_points(student, student.accuracy)}, difference {scale * gain:+.1f} +/- {scale * se:.1f}{unit}, within "
            f"{z:g} standard errors over {teacher.num_examples} rows): distillation moves the student toward the "
            "teacher, so expect no gain; use a stronger teacher or give it worked solutions"
        )
    if privileged and dataset is not None and "worked_solution" in dataset.column_names:
        worked, rows = sum(map(bool, dataset["worked_solution"])), len(dataset)
        if worked == 0:
            lines.append(
                f"warning: the teacher's privileged context holds only final answers (none of {rows} rows has a "
                "worked solution): knowing the result does not show the teacher how to reach it, so it has little to "
                "distill; give worked solutions or a separate, stronger teacher"
            )
        elif worked < rows / 2:
            lines.append(
                f"warning: only {worked} of {rows} rows give the teacher a worked solution; the others show it the "
                "final answer alone"
            )
    return lines


def regression_line(before, after, z: float = 2.0) -> str | None:
    """One plain line when the student got worse beyond noise (by more than `z` paired standard errors), else None.

    `before` / `after` are both `EvalResult` (a lower score is worse) or both `DivergenceResult` (a higher
    divergence from the teacher is worse).
    """
    if isinstance(before, DivergenceResult) and isinstance(after, DivergenceResult):
        change, se = after.change_from(before)
        if change > 0 and change > z * se:
            return (f"Distillation moved the student away from the teacher: the divergence rose from "
                    f"{before.mean:.4f} to {after.mean:.4f} nats/token ({change:+.4f} +/- {se:.4f}, paired over "
                    f"{after.num_prompts} prompts, beyond {z:g} standard errors).")
        return None
    if not (isinstance(before, EvalResult) and isinstance(after, EvalResult)):
        raise TypeError("regression_line compares two EvalResults or two DivergenceResults; got "
                        f"{type(before).__name__} and {type(after).__name__}")
    gain, se = _paired(after, before)
    if gain < 0 and gain < -z * se:
        scale, unit = (100, " points") if after.metric == "math_accuracy" else (1, "")
        name = "accuracy" if after.metric == "math_accuracy" else after.metric
        return (f"Distillation hurt: {name} fell from {_points(before, before.accuracy)} to "
                f"{_points(after, after.accuracy)} ({scale * gain:+.1f} +/- {scale * se:.1f}{unit}, paired over "
                f"{after.num_examples} rows, beyond {z:g} standard errors).")
    return None
