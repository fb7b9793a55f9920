"""The synthetic math task (multi-step arithmetic word problems), answer checking, the metric and evaluation."""

from .answers import ExtractedAnswer, extract_answer, is_correct, reference_value
from .arithmetic import LEVELS, Problem, generate_problems, make_problem
from .data import arithmetic_dataset, prepare_qa_dataset
from .evaluation import (
    EvalResult,
    evaluate_model,
    generate_completions,
    load_metric,
    metric_path,
    paired_difference,
)

__all__ = [
    "LEVELS",
    "EvalResult",
    "ExtractedAnswer",
    "Problem",
    "arithmetic_dataset",
    "evaluate_model",
    "extract_answer",
    "generate_completions",
    "generate_problems",
    "is_correct",
    "load_metric",
    "make_problem",
    "metric_path",
    "paired_difference",
    "prepare_qa_dataset",
    "reference_value",
]
