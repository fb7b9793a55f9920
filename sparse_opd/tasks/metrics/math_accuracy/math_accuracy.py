"""Accuracy and format-error rate of completions that end with `Answer: <number>`."""

import datasets
import evaluate

from sparse_opd.tasks.answers import extract_answer, reference_value

_DESCRIPTION = """
Accuracy of numeric answers extracted from free-form completions, and the rate of format errors.

A completion's answer is the number after its last `Answer:` (also `answer is`, `####`, `\\boxed{}`); without one,
the last number in the completion is taken and the completion counts as a format error.
accuracy = mean(extracted == reference); format_error_rate = mean(no `Answer: <number>` found).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the model completions.
    references (`list` of `str`): the reference answers: numbers, or GSM8K-style solutions ending `#### <number>`.
Returns:
    accuracy (`float`): fraction of completions whose extracted answer equals the reference.
    format_error_rate (`float`): fraction of completions without an `Answer: <number>`.
    num_examples (`int`): number of completions scored.
    correct (`list` of `bool`, with `per_example=True`): whether each completion is right.
Examples:
    >>> metric = evaluate.load(sparse_opd.tasks.metric_path())
    >>> metric.compute(predictions=["2 + 3 = 5\\nAnswer: 5", "I think 7"], references=["5", "8"])
    {'accuracy': 0.5, 'format_error_rate': 0.5, 'num_examples': 2}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MathAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, per_example=False):
        if len(predictions) == 0:
            raise ValueError("no predictions to score; pass at least one completion")
        correct, format_errors = [], 0
        for prediction, reference in zip(predictions, references):
            extracted = extract_answer(prediction)
            correct.append(extracted.value is not None and extracted.value == reference_value(reference))
            format_errors += not extracted.well_formatted
        n = len(predictions)
        scores = {"accuracy": sum(correct) / n, "format_error_rate": format_errors / n, "num_examples": n}
        if per_example:
            scores["correct"] = correct
        return scores
