"""Answer extraction and checking for tasks whose answer is a number.

A completion's answer is found the way math benchmarks' users score it (GSM8K's "flexible" match):
1. the last stated answer: `Answer: <n>`, `the answer is <n>`, `#### <n>`, `\\boxed{<n>}`;
2. else the last number anywhere in the completion.

Beside it, the *strict format* records whether that answer was given as `Answer: <n>` (what the task prompts ask
for). Accuracy counts both; the format rate says how often the model followed the instruction, so that a low score
from answers in the wrong place is told apart from wrong arithmetic.

Calculator annotations (`<<48/2=24>>`, GSM8K's marks for a calculator tool that fills in the result) are not
natural text: `strip_calculator_annotations` removes them from reference solutions before a teacher is shown one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER = r"(?:(?<![\w)\]])-)?(?:\$\s*)?" + _DIGITS  # a minus after a word or digit is subtraction
_STRICT = re.compile(r"answer\s*:\s*(?:\*\*)?\s*(" + _NUMBER + ")", re.IGNORECASE)
_STATED = (
    re.compile(r"answer\s+is\s*:?\s*(?:\*\*)?\s*(" + _NUMBER + ")", re.IGNORECASE),
    re.compile(r"answer\s*=\s*(" + _NUMBER + ")", re.IGNORECASE),
    re.compile(r"####\s*(" + _NUMBER + ")"),
)
_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_ANY_NUMBER = re.compile(_NUMBER)
_CALCULATOR = re.compile(r"<<[^<>]*>>")

FORMS = ("strict", "stated", "last_number", "none")


@dataclass(frozen=True)
class ExtractedAnswer:
    """The number a completion gives as its answer (`None` if it has none) and how it gave it.

    `form` is `"strict"` (`Answer: <n>`), `"stated"` (`the answer is <n>`, `#### <n>`, `\\boxed{<n>}`),
    `"last_number"` (no statement: the last number in the text) or `"none"` (no number at all).
    """

    value: Fraction | None
    form: str

    @property
    def well_formatted(self) -> bool:
        """Whether the answer was given in the asked `Answer: <n>` format."""
        return self.form == "strict"

    @property
    def stated(self) -> bool:
        """Whether the text says which number is its answer (any of the stated forms)."""
        return self.form in ("strict", "stated")


def parse_number(text: str) -> Fraction | None:
    """`"1,234"` -> 1234, `"$5"` -> 5, `"2.50"` -> 5/2, `"-3"` -> -3; `None` if `text` is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").strip()
    cleaned = cleaned.removesuffix(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def strip_calculator_annotations(text: str) -> str:
    """`"48/2 = <<48/2=24>>24 clips"` -> `"48/2 = 24 clips"`: GSM8K's calculator marks removed, the text kept."""
    return _CALCULATOR.sub("", text)


def _boxed_matches(completion: str):
    """``(position, number text)`` of each `\\boxed{...}` that holds a number (its last one: `\\boxed{\\$1{,}000}`)."""
    for match in _BOXED.finditer(completion):
        numbers = _ANY_NUMBER.findall(match.group(1).replace("{,}", ","))
        if numbers:
            yield match.start(), numbers[-1]


def extract_answer(completion: str) -> ExtractedAnswer:
    """The answer a completion gives; see the module docstring for the rules."""
    if not isinstance(completion, str):
        raise TypeError(f"a completion must be a string, got {type(completion).__name__}")
    found = [(m.start(), m.group(1), "strict") for m in _STRICT.finditer(completion)]
    for pattern in _STATED:
        found += [(m.start(), m.group(1), "stated") for m in pattern.finditer(completion)]
    found += [(start, number, "stated") for start, number in _boxed_matches(completion)]
    if found:
        _, number, form = max(found, key=lambda item: item[0])
        return ExtractedAnswer(parse_number(number), form)
    numbers = _ANY_NUMBER.findall(completion)
    if numbers:
        return ExtractedAnswer(parse_number(numbers[-1]), "last_number")
    return ExtractedAnswer(None, "none")


def reference_value(answer) -> Fraction:
    """The numeric value of a reference answer: an int/float, `"42"`, or a GSM8K-style solution ending `#### 42`."""
    if isinstance(answer, bool):
        raise TypeError("a reference answer must be a number or a string holding one, got a bool")
    if isinstance(answer, int):
        return Fraction(answer)
    if isinstance(answer, float):
        return Fraction(answer).limit_denominator(10**6)
    if not isinstance(answer, str):
        raise TypeError(f"a reference answer must be a number or a string, got {type(answer).__name__}")
    if "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    value = parse_number(answer)
    if value is None:
        raise ValueError(
            f"reference answer {answer!r} is not a number; pass the final numeric answer (or a GSM8K-style solution "
            "ending in '#### <number>') as the answer column"
        )
    return value


def parse_reference(raw) -> tuple[str, str] | None:
    """``(final answer as a string, worked solution or "")`` of a reference cell, or None if it holds no number.

    A cell may hold a bare number (``42``, ``"42"``), a GSM8K-style solution ending ``#### 42``, or a worked solution
    that states its answer (``... Answer: 42``, ``the answer is 42``, ``\\boxed{42}``). The worked solution keeps
    its text as written (calculator annotations included)."""
    if isinstance(raw, bool) or raw is None or (isinstance(raw, float) and not math.isfinite(raw)):
        return None  # a CSV's empty cell reads as NaN
    if isinstance(raw, (int, float)):
        value, worked = reference_value(raw), ""
    elif not isinstance(raw, str):
        return None
    elif "####" in raw:
        worked, final = (part.strip() for part in raw.rsplit("####", 1))
        value = parse_number(final)
    elif parse_number(raw.strip()) is not None:
        value, worked = parse_number(raw.strip()), ""
    else:
        found = extract_answer(raw)
        value, worked = (found.value, raw.strip()) if found.stated else (None, "")
    if value is None:
        return None
    return (str(value.numerator) if value.denominator == 1 else str(float(value))), worked


def has_working(text: str) -> bool:
    """Whether a reference holds working beyond its final answer: at least three words once calculator
    annotations and answer statements (`Answer: 5`, `#### 5`, ...) are removed."""
    text = strip_calculator_annotations(text)
    for pattern in (_STRICT, *_STATED, _BOXED):
        text = pattern.sub(" ", text)
    return len(re.findall(r"\w+", text)) >= 3


def teacher_solution(answer: str, worked: str) -> str:
    """The reference solution a teacher is shown: the worked solution without calculator annotations, ending with
    `Answer: <answer>` unless it already states its answer (the final answer alone when there is no worked one)."""
    worked = strip_calculator_annotations(worked).strip()
    if worked and extract_answer(worked).stated:
        return worked
    return (worked + "\n" if worked else "") + f"Answer: {answer}"


def is_correct(completion: str, answer) -> bool:
    """Whether the number extracted from `completion` equals the reference `answer` (in any answer form)."""
    predicted = extract_answer(completion).value
    return predicted is not None and predicted == reference_value(answer)
