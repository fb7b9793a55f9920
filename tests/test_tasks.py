"""The synthetic arithmetic task, answer extraction, the packaged metric and the generic question/answer path."""

from __future__ import annotations

import json
import random
from fractions import Fraction

import pytest
from datasets import load_dataset
from test_trainer_support import tiny_llama, tiny_tokenizer

from sparse_opd.tasks import (
    LEVELS,
    arithmetic_dataset,
    evaluate_model,
    extract_answer,
    generate_problems,
    is_correct,
    load_metric,
    make_problem,
    prepare_qa_dataset,
    reference_value,
)


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_problem_answer_equals_replaying_its_worked_steps(level):
    rng = random.Random(level)
    for _ in range(200):
        problem = make_problem(rng, level)
        assert len(problem.steps) == LEVELS[level]["steps"]
        value = None
        for step in problem.steps:
            lhs, result = step.split(" = ")
            a, op, b = lhs.split(" ")
            a, b, result = int(a), int(b), int(result)
            assert value is None or a == value, "each step starts from the previous result"
            expected = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            assert op != "/" or a % b == 0, "divisions are exact"
            assert result == expected >= 0
            value = result
        assert problem.answer == value
        assert problem.solution.endswith(f"Answer: {value}")


def test_splits_are_reproducible_and_test_problems_are_not_in_train():
    a = arithmetic_dataset("test", 50, 2)
    b = arithmetic_dataset("test", 50, 2)
    assert a["prompt"] == b["prompt"] and a["answer"] == b["answer"]
    train_questions = {p.question for p in generate_problems(10_000, 2, 1_000)}
    test_questions = {row[0]["content"].split("\n")[0] for row in a["prompt"]}
    assert not test_questions & train_questions
    assert arithmetic_dataset("validation", 50, 2)["prompt"] != a["prompt"]


def test_dataset_columns_and_privileged_prompt_contents():
    ds = arithmetic_dataset("train", 6, [1, 3], teacher_context="both", num_examples_in_context=2)
    assert set(ds.column_names) == {"prompt", "answer", "teacher_prompt", "solution", "level"}
    assert sorted(ds["level"]) == [1, 1, 1, 3, 3, 3]
    row = ds[0]
    student, teacher = row["prompt"][-1]["content"], row["teacher_prompt"][-1]["content"]
    assert row["solution"] not in student, "the student never sees the reference solution"
    assert row["solution"] in teacher and teacher.count("Example problem:") == 2
    assert teacher.endswith(student), "the teacher sees the same question, last"


def test_bad_task_arguments_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="level"):
        arithmetic_dataset("train", 4, 7)
    with pytest.raises(ValueError, match="split"):
        arithmetic_dataset("dev", 4, 1)
    with pytest.raises(ValueError, match="teacher context"):
        arithmetic_dataset("train", 4, 1, teacher_context="hints")


@pytest.mark.parametrize(
    "completion, value, well_formatted",
    [
        ("3 + 4 = 7\nAnswer: 7", 7, True),
        ("The answer is $1,250.", 1250, True),
        ("so #### 42", 42, True),
        ("\\boxed{-3}", -3, True),
        ("Answer: 5. Wait, Answer: 6", 6, True),
        ("first 12 then 15 apples", 15, False),
        ("no number here", None, False),
        ("Answer: 2.50", Fraction(5, 2), True),
    ],
)
def test_extract_answer(completion, value, well_formatted):
    extracted = extract_answer(completion)
    assert extracted.value == (None if value is None else Fraction(value))
    assert extracted.well_formatted is well_formatted


def test_reference_values_and_correctness():
    assert reference_value("Natalia sold 48/2 = 24 clips.\n#### 72") == 72
    assert reference_value(3) == 3 and reference_value("1,000") == 1000
    assert is_correct("Answer: 72", "#### 72") and not is_correct("Answer: 71", "72")
    with pytest.raises(ValueError, match="not a number"):
        reference_value("seventy-two")


def test_metric_loads_by_local_path_and_scores():
    metric = load_metric()
    scores = metric.compute(
        predictions=["2 + 3 = 5\nAnswer: 5", "I think 7", "Answer: 9", "nothing"], references=["5", "7", "8", "1"]
    )
    assert scores == {"accuracy": 0.5, "format_error_rate": 0.5, "num_examples": 4}


def test_prepare_qa_dataset_on_a_local_gsm8k_style_json(tmp_path):
    rows = [
        {"question": "Tom has 3 cats and buys 2. How many cats?", "answer": "3 + 2 = 5\n#### 5"},
        {"question": "What is 10 - 4?", "answer": "6"},
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    ds = prepare_qa_dataset(load_dataset("json", data_files=str(path))["train"])
    assert ds["answer"] == ["5", "6"]
    assert ds["solution"] == ["3 + 2 = 5\nAnswer: 5", "Answer: 6"]
    assert "3 + 2 = 5" in ds[0]["teacher_prompt"][-1]["content"]
    assert ds[0]["prompt"][-1]["content"].startswith(rows[0]["question"])
    with pytest.raises(ValueError, match="answer_column"):
        prepare_qa_dataset(load_dataset("json", data_files=str(path))["train"], answer_column="final")


def test_evaluate_model_scores_every_row_in_order():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer)
    ds = arithmetic_dataset("test", 6, 1)
    result = evaluate_model(model, tokenizer, ds, batch_size=4, max_new_tokens=4)
    assert result.num_examples == 6 and len(result.completions) == 6
    expected = sum(is_correct(c, a) for c, a in zip(result.completions, ds["answer"])) / 6
    assert result.accuracy == expected
    assert 0 <= result.format_error_rate <= 1
