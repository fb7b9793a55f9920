"""Datasets in the trainer's format: a conversational `prompt`, an `answer`, and the teacher's privileged prompt.

Two sources produce the same columns:
- `arithmetic_dataset`: the synthetic task (no download), fixed-seed splits.
- `prepare_qa_dataset`: any dataset with a question column and an answer column (for instance GSM8K, whose answers end
  with `#### <number>`), for users with Hub access or their own files.

Columns: `prompt` (list of chat messages the student sees), `answer` (the final answer as a string),
`teacher_prompt` (chat messages with the privileged context, seen only by a context-distillation teacher), and
`solution` (the worked reference solution; empty when the source has none).
"""

from __future__ import annotations

import functools
import random

from datasets import Dataset

from .answers import reference_value
from .arithmetic import SPLIT_SEEDS, Problem, generate_problems, privileged_message, user_message

TRAIN_POOL = 10_000


@functools.lru_cache(maxsize=8)
def _train_questions(level: int) -> frozenset[str]:
    return frozenset(p.question for p in generate_problems(TRAIN_POOL, level, SPLIT_SEEDS["train"]))


def _messages(text: str, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": text}]


def arithmetic_dataset(
    split: str = "train",
    num_examples: int = 1000,
    level: int | list[int] = 2,
    teacher_context: str = "solution",
    num_examples_in_context: int = 2,
    system_prompt: str | None = None,
) -> Dataset:
    """Synthetic multi-step arithmetic word problems (see `sparse_opd.tasks.arithmetic`).

    Args:
        split: `"train"`, `"validation"` or `"test"`; each has its own seed, so splits are reproducible, and no
            validation/test problem appears among the first `TRAIN_POOL` (10,000) training problems of its level.
        num_examples: number of problems (spread evenly over the levels when several are given).
        level: a difficulty level (1-4) or a list of them.
        teacher_context: what the teacher sees in `teacher_prompt`: `"solution"` (the worked reference solution),
            `"examples"` (worked examples of other problems of the same level) or `"both"`.
        num_examples_in_context: worked examples per teacher prompt for `"examples"` / `"both"`.
        system_prompt: optional system message for both prompts (else the chat template's default applies).
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLIT_SEEDS)}")
    levels = [level] if isinstance(level, int) else list(level)
    if not levels:
        raise ValueError("level must be an int or a non-empty list of ints")
    counts = [num_examples // len(levels) + (i < num_examples % len(levels)) for i in range(len(levels))]
    rows = []
    for lvl, count in zip(levels, counts, strict=True):
        if split == "train":
            problems = generate_problems(count, lvl, SPLIT_SEEDS[split])
        else:  # evaluation problems never appear among the first TRAIN_POOL training problems
            exclude = _train_questions(lvl)
            pool = generate_problems(2 * count + 100, lvl, SPLIT_SEEDS[split])
            problems = [p for p in pool if p.question not in exclude][:count]
            if len(problems) < count:
                raise RuntimeError(f"not enough distinct level-{lvl} problems for {split}; ask for fewer")
        shots = generate_problems(64, lvl, SPLIT_SEEDS[split] + 7) if teacher_context != "solution" else []
        rng = random.Random(f"shots/{split}/{lvl}")
        for problem in problems:
            examples = rng.sample(shots, num_examples_in_context) if shots else None
            rows.append(_row(problem, teacher_context, examples, system_prompt))
    rng = random.Random(f"order/{split}")
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def _row(problem: Problem, teacher_context: str, examples, system_prompt) -> dict:
    return {
        "prompt": _messages(user_message(problem.question), system_prompt),
        "answer": str(problem.answer),
        "teacher_prompt": _messages(
            privileged_message(problem.question, problem.solution, teacher_context, examples), system_prompt
        ),
        "solution": problem.solution,
        "level": problem.level,
    }


def prepare_qa_dataset(
    dataset: Dataset,
    question_column: str = "question",
    answer_column: str = "answer",
    teacher_context: str = "solution",
    system_prompt: str | None = None,
) -> Dataset:
    """Bring a question/answer dataset (e.g. GSM8K) into the trainer's format.

    The answer column may hold a number or a solution ending in `#### <number>` (GSM8K); the number becomes
    `answer`, and the text before `####` (if any) becomes the worked `solution` shown to a context-distillation
    teacher. With `teacher_context="solution"` a row without a worked solution is shown its final answer instead.
    """
    for column in (question_column, answer_column):
        if column not in dataset.column_names:
            raise ValueError(
                f"column {column!r} is not in the dataset (columns: {dataset.column_names}); pass the right "
                "`question_column` / `answer_column`"
            )
    if teacher_context not in ("solution", "none"):
        raise ValueError(
            f"teacher_context {teacher_context!r} is not available for a generic dataset; use 'solution' or 'none'"
        )

    def convert(example):
        raw = example[answer_column]
        value = reference_value(raw)
        answer = str(value.numerator) if value.denominator == 1 else str(float(value))
        worked = raw.rsplit("####", 1)[0].strip() if isinstance(raw, str) and "####" in raw else ""
        solution = (worked + "\n" if worked else "") + f"Answer: {answer}"
        question = example[question_column]
        row = {"prompt": _messages(user_message(question), system_prompt), "answer": answer, "solution": solution}
        if teacher_context == "solution":
            row["teacher_prompt"] = _messages(privileged_message(question, solution, "solution"), system_prompt)
        return row

    keep = {"prompt", "answer", "solution", "teacher_prompt"}
    return dataset.map(convert, remove_columns=[c for c in dataset.column_names if c not in keep])
