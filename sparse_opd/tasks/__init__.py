"""Tasks and evaluation: the synthetic math task, question/answer and TRL-format prompt data, answer checking, the
packaged metric and user metrics, accuracy and teacher-student divergence before and after, and plain-language
checks around a run."""

from .answers import (
    ExtractedAnswer,
    extract_answer,
    has_working,
    is_correct,
    parse_reference,
    reference_value,
    strip_calculator_annotations,
)
from .arithmetic import LEVELS, Problem, generate_problems, make_problem
from .checks import regression_line, teacher_warnings
from .data import arithmetic_dataset, load_qa_dataset, prepare_dataset, prepare_qa_dataset
from .divergence import DivergenceResult, generalized_jsd, teacher_student_divergence
from .evaluation import EvalResult, evaluate_model, paired_difference
from .generation import generate_completions
from .lengths import GenerationLength, generation_length
from .prompts import answers_are_numbers, prepare_prompt_dataset
from .scoring import Scorer, Scores, load_metric, load_scorer, metric_path

__all__ = [
    "LEVELS",
    "DivergenceResult",
    "EvalResult",
    "ExtractedAnswer",
    "GenerationLength",
    "Problem",
    "Scorer",
    "Scores",
    "answers_are_numbers",
    "arithmetic_dataset",
    "evaluate_model",
    "extract_answer",
    "generalized_jsd",
    "generate_completions",
    "generate_problems",
    "generation_length",
    "has_working",
    "is_correct",
    "load_metric",
    "load_qa_dataset",
    "load_scorer",
    "make_problem",
    "metric_path",
    "paired_difference",
    "parse_reference",
    "prepare_dataset",
    "prepare_prompt_dataset",
    "prepare_qa_dataset",
    "reference_value",
    "regression_line",
    "strip_calculator_annotations",
    "teacher_student_divergence",
    "teacher_warnings",
]
