"""Datasets in the trainer's format: a `prompt`, an `answer`, and the teacher's privileged prompt.

Three sources produce the same columns:
- `arithmetic_dataset`: the synthetic task (no download), fixed-seed splits.
- `prepare_qa_dataset`: any dataset with a question column and an answer column (for instance GSM8K, whose answers end
  with `#### <number>`), for users with Hub access or their own files.
- `sparse_opd.tasks.prompts.prepare_prompt_dataset`: any data in TRL's prompt formats, with or without answers.
`prepare_dataset` picks between the last two from the columns.

Columns: `prompt` (what the student sees), `answer` (the final answer as a string), `teacher_prompt` (the privileged
context, seen only by a context-distillation teacher), `solution` (the reference solution the teacher is shown, without
calculator annotations, ending `Answer: <n>`) and `worked_solution` (whether it holds working beyond the answer).
"""

from __future__ import annotations

import functools
import random

from datasets import Dataset

from .answers import has_working, parse_reference, teacher_solution
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


UNPARSEABLE = ("skip", "error")


def prepare_qa_dataset(
    dataset: Dataset,
    question_column: str = "question",
    answer_column: str = "answer",
    teacher_context: str = "solution",
    system_prompt: str | None = None,
    solution_column: str | None = None,
    on_unparseable: str = "skip",
    name: str = "the dataset",
) -> Dataset:
    """Bring a question/answer dataset (e.g. GSM8K, or a user's own rows) into the trainer's format.

    Each answer cell may be a bare number, a GSM8K-style solution ending in `#### <number>`, or a worked solution
    that states its answer (`Answer: <number>`, `the answer is <number>`, `\\boxed{<number>}`); `solution_column`
    may hold the worked solution separately. The number becomes `answer`; the worked solution, if any, becomes
    `solution`, which a context-distillation teacher (`teacher_context="solution"`) is shown. A row with only a final
    answer shows the teacher that answer alone (`Answer: <number>`). Rows whose answer holds no number are skipped
    and counted in `dataset.info.description` (`on_unparseable="skip"`) or refused (`"error"`).
    """
    if len(dataset) == 0:
        raise ValueError(f"{name} has no rows")
    for column in (question_column, answer_column, solution_column):
        if column is not None and column not in dataset.column_names:
            raise ValueError(
                f"{name} has no column {column!r} (columns: {dataset.column_names}); pass the right "
                "--question_column / --answer_column / --solution_column"
            )
    if teacher_context not in ("solution", "none"):
        raise ValueError(
            f"teacher_context {teacher_context!r} is not available for a question/answer dataset; use 'solution' or "
            "'none'"
        )
    if on_unparseable not in UNPARSEABLE:
        raise ValueError(f"on_unparseable must be one of {UNPARSEABLE}, got {on_unparseable!r}")
    parsed = [parse_reference(raw) for raw in dataset[answer_column]]
    bad = [i for i, p in enumerate(parsed) if p is None]
    if bad and (on_unparseable == "error" or len(bad) == len(parsed)):
        example = dataset[bad[0]][answer_column]
        raise ValueError(
            f"{name}: {len(bad)} of {len(parsed)} rows have an answer with no number (row {bad[0]}: {example!r}); "
            "answers must be a number, end in '#### <number>' or state 'Answer: <number>'"
        )
    keep = [i for i, p in enumerate(parsed) if p is not None]

    def convert(example, answer, worked):
        if solution_column is not None and example[solution_column]:
            worked = str(example[solution_column]).strip()
        solution = teacher_solution(answer, worked)
        question = example[question_column]
        row = {"prompt": _messages(user_message(question), system_prompt), "answer": answer, "solution": solution,
               "worked_solution": has_working(worked)}
        if teacher_context == "solution":
            row["teacher_prompt"] = _messages(privileged_message(question, solution, "solution"), system_prompt)
        return row

    rows = [convert(dataset[i], *parsed[i]) for i in keep]
    out = Dataset.from_list(rows)
    out.info.description = f"{name}: {len(keep)} rows kept, {len(bad)} skipped (answer with no number)"
    return out


def prepare_dataset(
    dataset: Dataset,
    question_column: str | None = None,
    prompt_column: str | None = None,
    answer_column: str | None = None,
    solution_column: str | None = None,
    teacher_context: str = "solution",
    system_prompt: str | None = None,
    on_unparseable: str = "skip",
    name: str = "the dataset",
) -> Dataset:
    """Question/answer rows (`prepare_qa_dataset`) or TRL-format prompts (`prepare_prompt_dataset`), chosen by the
    flags given, else by the columns: `prompt` or `messages` make prompt data, `question` question/answer data.
    A dataset with neither is refused in one line naming its columns and the flags to set."""
    from .prompts import FORMAT_HELP, PROMPT_COLUMNS, prepare_prompt_dataset

    columns = dataset.column_names
    if question_column is not None and prompt_column is not None:
        raise ValueError("pass --question_column or --prompt_column, not both")
    if prompt_column is None and (question_column is not None or not set(PROMPT_COLUMNS) & set(columns)):
        if question_column is not None and question_column not in columns:
            raise ValueError(f"{name} has no column {question_column!r} (columns: {columns}); pass the right "
                             "--question_column, or --prompt_column for prompt data")
        question_column = question_column or "question"
        if question_column not in columns:
            raise ValueError(f"{name} has no usable prompt column (columns: {columns}): {FORMAT_HELP}")
        return prepare_qa_dataset(dataset, question_column, answer_column or "answer", teacher_context, system_prompt,
                                  solution_column, on_unparseable, name)
    if solution_column is not None:
        raise ValueError("--solution_column applies to question/answer data; prompt data takes the reference from "
                         "--answer_column, a 'completion' column or the final assistant message")
    return prepare_prompt_dataset(dataset, prompt_column, answer_column, teacher_context, system_prompt,
                                  on_unparseable, name)


def load_qa_dataset(source: str, split: str = "train", config: str | None = None) -> Dataset:
    """A split of a Hub dataset, or the rows of a local .json / .jsonl / .csv / .parquet file (split ignored)."""
    import os

    from datasets import load_dataset

    if os.path.isfile(source):
        kinds = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
        kind = kinds.get(os.path.splitext(source)[1])
        if kind is None:
            raise ValueError(f"{source}: unsupported file type; use .json, .jsonl, .csv or .parquet")
        if os.path.getsize(source) == 0:
            raise ValueError(f"{source} is empty")
        return load_dataset(kind, data_files=source, split="train")
    if source.endswith((".json", ".jsonl", ".csv", ".parquet")) or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"dataset file {source} does not exist")
    return load_dataset(source, config, split=split)
