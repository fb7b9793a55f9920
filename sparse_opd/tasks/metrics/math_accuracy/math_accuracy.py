"""Accuracy of numeric answers (found as math benchmarks' users find them), the strict format's accuracy and the
format-error rate."""

import datasets
import evaluate

from sparse_opd.tasks.answers import extract_answer, reference_value

_DESCRIPTION = """
Accuracy of numeric answers extracted from free-form completions, and the rate of format errors.

A completion's answer is its last stated answer (`Answer: <n>`, `the answer is <n>`, `#### <n>`, `\\boxed{<n>}`), else
the last number in it (GSM8K's "flexible" match). A completion whose answer is not given as `Answer: <n>` (the
format the task prompts ask for) is a format error.
accuracy = mean(extracted == reference); strict_accuracy = mean(extracted == reference and given as
`Answer: <n>`); format_error_rate = mean(answer not given as `Answer: <n>`).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the model completions.
    references (`list` of `str`): the reference answers: numbers, or GSM8K-style solutions ending `#### <number>`.
Returns:
    accuracy (`float`): fraction of completions whose extracted answer equals the reference.
    strict_accuracy (`float`): fraction right and given as `Answer: <number>`.
    format_error_rate (`float`): fraction whose answer is not given as `Answer: <number>`.
    num_examples (`int`): number of completions scored.
    correct (`list` of `bool`, with `per_example=True`): whether each completion is right.
Examples:
    >>> metric = evaluate.load(sparse_opd.tasks.metric_path())
    >>> metric.compute(predictions=["2 + 3 = 5\\nAnswer: 5", "I think 7"], references=["5", "8"])
    {'accuracy': 0.5, 'strict_accuracy': 0.5, 'format_error_rate': 0.5, 'num_examples': 2}
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
        correct, strict = [], []
        for prediction, reference in zip(predictions, references):
            extracted = extract_answer(prediction)
            correct.append(extracted.value is not None and extracted.value == reference_value(reference))
            strict.append(extracted.well_formatted)
        n = len(predictions)
        scores = {
            "accuracy": sum(correct) / n,
            "strict_accuracy": sum(c and s for c, s in zip(correct, strict)) / n,
            "format_error_rate": (n - sum(strict)) / n,
            "num_examples": n,
        }
        if per_example:
            scores["correct"] = correct
        return scores
