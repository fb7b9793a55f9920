"""Answer extraction and checking for tasks whose answer is a number.

A completion is expected to end with `Answer: <number>` (the format the task prompts ask for). Extraction tries, in
order: the last `Answer: <number>` (also `answer is <number>`, `#### <number>`, `\\boxed{<number>}`), then falls back
to the last number anywhere in the text. The fallback still scores, but counts as a *format error*: the model did not
say which number was its answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

_NUMBER = r"[-+]?\$?\s*\d[\d,]*(?:\.\d+)?"
_STRICT_PATTERNS = (
    re.compile(r"answer\s*(?:is|:|=)\s*(?:\*\*)?\s*(" + _NUMBER + ")", re.IGNORECASE),
    re.compile(r"####\s*(" + _NUMBER + ")"),
    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
)
_ANY_NUMBER = re.compile(_NUMBER)


@dataclass(frozen=True)
class ExtractedAnswer:
    """The number a completion gives as its answer (`None` if it has none) and whether it used the asked format."""

    value: Fraction | None
    well_formatted: bool


def parse_number(text: str) -> Fraction | None:
    """`"1,234"` -> 1234, `"$5"` -> 5, `"2.50"` -> 5/2; `None` if `text` is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").strip()
    cleaned = cleaned.removesuffix(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(completion: str) -> ExtractedAnswer:
    """The answer a completion gives; see the module docstring for the rules."""
    if not isinstance(completion, str):
        raise TypeError(f"a completion must be a string, got {type(completion).__name__}")
    best = None
    for pattern in _STRICT_PATTERNS:
        for match in pattern.finditer(completion):
            if best is None or match.start() > best.start():
                best = match
    if best is not None:
        return ExtractedAnswer(parse_number(best.group(1)), True)
    numbers = _ANY_NUMBER.findall(completion)
    return ExtractedAnswer(parse_number(numbers[-1]) if numbers else None, False)


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


def is_correct(completion: str, answer) -> bool:
    """Whether the number extracted from `completion` equals the reference `answer`."""
    predicted = extract_answer(completion).value
    return predicted is not None and predicted == reference_value(answer)
