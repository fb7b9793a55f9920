"""How many tokens to generate when evaluating, from the data itself.

A model cut off before its final answer scores as wrong, so a fixed length silently measures truncation. The length
comes from the reference solutions the teacher is shown (the worked solutions, calculator annotations removed, ending
`Answer: <n>`): a quantile of their token lengths, scaled for a model's wordier style, plus a margin, capped. When the
data has no worked solutions to measure (answer-only rows, prompts without references), the caller's fallback is used
and the reason says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationLength:
    """A number of new tokens and, in words, where it came from (for the job's output and the model card)."""

    max_new_tokens: int
    reason: str

    def __int__(self) -> int:
        return self.max_new_tokens


def quantile(values: list[int], q: float) -> int:
    """The nearest-rank `q`-quantile of `values` (the smallest value with at least a fraction `q` at or below it)."""
    if not values:
        raise ValueError("quantile of no values")
    if not 0 < q <= 1:
        raise ValueError(f"the quantile must be in (0, 1], got {q}")
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def generation_length(
    tokenizer,
    references: list[str],
    fallback: int,
    q: float = 0.95,
    scale: float = 1.5,
    margin: int = 32,
    cap: int = 1024,
    min_references: int = 8,
) -> GenerationLength:
    """``ceil(scale * quantile_q(token lengths of references)) + margin``, at most `cap`; `fallback` (with the reason)
    when fewer than `min_references` references are given.

    For a prepared dataset pass the solutions of the rows with working:
    ``[s for s, w in zip(ds["solution"], ds["worked_solution"]) if w]``.
    """
    if fallback < 1 or cap < 1:
        raise ValueError(f"fallback and cap must be >= 1, got {fallback} and {cap}")
    if len(references) < min_references:
        return GenerationLength(fallback, f"{fallback} new tokens (fallback: {len(references)} worked reference "
                                          f"solutions in the data, fewer than {min_references} to measure)")
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in references]
    at_q = quantile(lengths, q)
    tokens = min(cap, math.ceil(scale * at_q) + margin)
    capped = f", capped at {cap}" if tokens == cap else ""
    return GenerationLength(tokens, f"{tokens} new tokens: {scale:g} x the {100 * q:g}th percentile of {len(lengths)} "
                                    f"reference solutions ({at_q} tokens) + {margin}{capped}")
