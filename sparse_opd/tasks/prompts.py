"""Any on-policy distillation data in TRL's prompt formats, with or without reference answers.

On-policy distillation needs prompts and a teacher, not answers. A row's prompt comes from
- a `prompt` column: a string (standard format) or a list of chat messages (conversational), as
  `trl.DistillationTrainer` reads it; or
- a `messages` column (TRL's conversational language-modeling format): the conversation up to its last non-assistant
  message is the prompt, and a final assistant message is the reference answer.

A reference, when there is one, comes from the answer column, a `completion` column (TRL's prompt-completion format)
or the final assistant message. References that all hold a number (a bare number, `... #### 42`, a worked solution
stating `Answer: 42`) are numeric: `answer` is the number and the packaged `math_accuracy` metric scores them.
Others are text, scored by a metric the user names (`sparse_opd.tasks.scoring`). With no reference, the rows still
train and evaluate through the teacher-student divergence (`sparse_opd.tasks.divergence`).

The teacher's privileged context (`teacher_prompt`) is the prompt with the reference in front of it; a dataset that
brings its own `teacher_prompt` column keeps it.
"""

from __future__ import annotations

import copy
import math

from datasets import Dataset

from .answers import has_working, parse_number, parse_reference, teacher_solution

PROMPT_COLUMNS = ("prompt", "messages")
FORMAT_HELP = (
    "give a 'prompt' column (text, or a list of chat messages) or a 'messages' column (TRL's formats), or pass "
    "--prompt_column NAME; for question/answer data pass --question_column and --answer_column"
)


def is_messages(value) -> bool:
    """Whether `value` is a list of chat messages (dicts with a role), as TRL's `is_conversational` reads a cell."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def message_text(message: dict) -> str:
    """The text of a chat message whose content is a string or a list of typed parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def find_prompt_column(columns: list[str], prompt_column: str | None = None, name: str = "the dataset") -> str:
    """The column holding the prompts: `prompt_column` if given, else `prompt`, else `messages`; a one-line error
    naming the columns found otherwise."""
    if prompt_column is not None:
        if prompt_column not in columns:
            raise ValueError(f"{name} has no column {prompt_column!r} (columns: {columns}); pass the right "
                             "--prompt_column")
        return prompt_column
    for column in PROMPT_COLUMNS:
        if column in columns:
            return column
    raise ValueError(f"{name} has no usable prompt column (columns: {columns}): {FORMAT_HELP}")


def split_conversation(messages: list[dict]) -> tuple[list[dict], str | None]:
    """``(prompt messages, reference or None)``: a conversation's trailing assistant message is its reference."""
    if messages and messages[-1].get("role") == "assistant" and len(messages) > 1:
        return messages[:-1], message_text(messages[-1])
    return messages, None


def privileged_prompt(prompt, reference: str):
    """The prompt with the reference in front of the task, in the prompt's own format (for chat messages, the last
    user message is rewritten)."""
    def wrap(text: str) -> str:
        return f"Reference answer (check your work against it):\n{reference}\n\nNow the task.\n{text}"

    if isinstance(prompt, str):
        return wrap(prompt)
    messages = copy.deepcopy(prompt)
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            message["content"] = wrap(message["content"])
            return messages
    raise ValueError("a privileged teacher prompt rewrites the last user message, but this prompt has no user message "
                     "with text content; set --teacher_context none or give a 'teacher_prompt' column")


def _prompt_of(value, column: str, system_prompt: str | None, row: int, name: str):
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{name}: row {row} has an empty {column!r}; every row needs a prompt")
        if system_prompt:
            raise ValueError(f"{name}: system_prompt needs chat prompts, but {column!r} holds text")
        return value, None
    if not is_messages(value):
        raise ValueError(f"{name}: row {row} of {column!r} is a {type(value).__name__}, neither text nor a list of "
                         f"chat messages; {FORMAT_HELP}")
    prompt, reference = split_conversation(value) if column == "messages" else (value, None)
    if system_prompt and prompt[0].get("role") != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return prompt, reference


def _reference_cell(example: dict, answer_column: str | None, conversation_reference: str | None):
    if answer_column is not None:
        return example[answer_column]
    if "completion" in example:
        completion = example["completion"]
        return "".join(message_text(m) for m in completion) if is_messages(completion) else completion
    return conversation_reference


def _missing(cell) -> bool:
    return (cell is None or (isinstance(cell, str) and not cell.strip())
            or (isinstance(cell, float) and math.isnan(cell)))


def prepare_prompt_dataset(
    dataset: Dataset,
    prompt_column: str | None = None,
    answer_column: str | None = None,
    teacher_context: str = "solution",
    system_prompt: str | None = None,
    on_missing: str = "skip",
    name: str = "the dataset",
) -> Dataset:
    """Bring a dataset in TRL's prompt formats into the trainer's (see the module docstring).

    Args:
        prompt_column: the prompt column; by default `prompt`, else `messages`.
        answer_column: the reference answers; by default `answer` if present, else `completion`, else a
            conversation's final assistant message, else none.
        teacher_context: `"solution"` (the teacher sees the reference, `teacher_prompt`) or `"none"`.
        on_missing: rows without a reference when others have one: `"skip"` (counted in `info.description`) or
            `"error"`.

    Returns a dataset with `prompt`; with references also `answer`, `solution` (the reference as the teacher sees
    it: numeric ones end `Answer: <n>`, calculator annotations removed), `worked_solution` (whether it holds more
    than the final answer) and `teacher_prompt`. Other columns are kept.
    """
    if len(dataset) == 0:
        raise ValueError(f"{name} has no rows")
    columns = dataset.column_names
    column = find_prompt_column(columns, prompt_column, name)
    if answer_column is None and "answer" in columns:
        answer_column = "answer"
    elif answer_column is not None and answer_column not in columns:
        raise ValueError(f"{name} has no column {answer_column!r} (columns: {columns}); pass the right "
                         "--answer_column or none for data without answers")
    if teacher_context not in ("solution", "none"):
        raise ValueError(f"teacher_context {teacher_context!r} is not available for prompt data; use 'solution' or "
                         "'none'")
    if on_missing not in ("skip", "error"):
        raise ValueError(f"on_missing must be 'skip' or 'error', got {on_missing!r}")
    rows, cells = [], []
    for i, example in enumerate(dataset):
        prompt, conversation_reference = _prompt_of(example[column], column, system_prompt, i, name)
        cells.append(_reference_cell(example, answer_column, conversation_reference))
        drop = {column, "completion"} if column == "messages" else {"completion"}
        rows.append({**{k: v for k, v in example.items() if k not in drop}, "prompt": prompt})
    present = [i for i, cell in enumerate(cells) if not _missing(cell)]
    if not present:
        out = Dataset.from_list(rows)
        out.info.description = f"{name}: {len(rows)} prompts, no reference answers"
        return out
    missing = len(rows) - len(present)
    if missing and on_missing == "error":
        first = next(i for i, cell in enumerate(cells) if _missing(cell))
        raise ValueError(f"{name}: {missing} of {len(rows)} rows have no reference answer (row {first}); give every "
                         "row one, or none")
    parsed = [parse_reference(cells[i]) for i in present]
    numeric = all(p is not None for p in parsed)
    out_rows = []
    for i, found in zip(present, parsed):
        row = rows[i]
        if numeric:
            answer, worked = found
            solution = teacher_solution(answer, worked)
        else:
            answer = worked = solution = str(cells[i]).strip()
        row.update(answer=answer, solution=solution, worked_solution=has_working(worked))
        if teacher_context == "solution" and "teacher_prompt" not in columns:
            row["teacher_prompt"] = privileged_prompt(row["prompt"], solution)
        out_rows.append(row)
    out = Dataset.from_list(out_rows)
    kind = "numeric" if numeric else "text"
    out.info.description = (f"{name}: {len(out_rows)} prompts with {kind} reference answers"
                            + (f", {missing} without one skipped" if missing else ""))
    return out


def answers_are_numbers(dataset) -> bool:
    """Whether every `answer` of a prepared dataset is a number (so the packaged `math_accuracy` metric applies)."""
    if "answer" not in dataset.column_names:
        return False
    return all(not isinstance(a, bool) and parse_number(str(a)) is not None for a in dataset["answer"])
