"""Procedurally generated multi-step arithmetic word problems with verifiable integer answers.

Every problem follows one quantity (a person's apples, a shop's boxes, ...) through `steps` operations written as
sentences, then asks for the final amount. Levels set the number of steps, the operations allowed and the size of
the numbers:

| level | steps | operations          | numbers  |
|-------|-------|---------------------|----------|
| 1     | 1     | +, -                | 1..20    |
| 2     | 2     | +, -                | 1..50    |
| 3     | 3     | +, -, x             | 1..50    |
| 4     | 4     | +, -, x, / (exact)  | 1..100   |

Intermediate amounts stay non-negative integers, divisions are exact. Splits are disjoint by construction: the
train and test problems come from different seeds, and any test problem whose text also appears in train is
regenerated.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

LEVELS = {
    1: {"steps": 1, "ops": ("+", "-"), "max": 20},
    2: {"steps": 2, "ops": ("+", "-"), "max": 50},
    3: {"steps": 3, "ops": ("+", "-", "*"), "max": 50},
    4: {"steps": 4, "ops": ("+", "-", "*", "/"), "max": 100},
}

SPLIT_SEEDS = {"train": 1_000, "validation": 2_000, "test": 3_000}

INSTRUCTION = "Solve the problem step by step. End your reply with 'Answer: <number>'."

_NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Lena", "Omar", "Maya", "Noah")
_ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells", "cards")
_ADD = ("{who} buys {n} more {items}.", "{who} finds {n} more {items}.", "A friend gives {who} {n} {items}.")
_SUB = ("{who} gives away {n} {items}.", "{who} loses {n} {items}.", "{who} uses {n} of the {items}.")
_MUL = (
    "{who} ends up with {n} times as many {items} as before.",
    "The number of {items} {who} has is multiplied by {n}.",
)
_DIV = (
    "{who} splits the {items} into {n} equal groups and keeps one group.",
    "{who} keeps only one {n}th of the {items}.",
)


@dataclass(frozen=True)
class Problem:
    """One word problem: its text, integer answer, worked solution (one line per step) and level."""

    question: str
    answer: int
    solution: str
    level: int
    steps: tuple[str, ...] = field(default=())


def _check_level(level: int) -> dict:
    if level not in LEVELS:
        raise ValueError(f"unknown difficulty level {level!r}; choose one of {sorted(LEVELS)}")
    return LEVELS[level]


def make_problem(rng: random.Random, level: int) -> Problem:
    """Draw one problem of the given level from `rng`."""
    spec = _check_level(level)
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    hi = spec["max"]
    value = rng.randint(2, hi)
    sentences = [f"{name} has {value} {items}."]
    work = []
    for _ in range(spec["steps"]):
        op = rng.choice(spec["ops"])
        if op == "/":
            divisors = [d for d in range(2, 6) if value % d == 0 and value > 0]
            op = "/" if divisors else "+"
        if op == "-" and value < 2:
            op = "+"
        if op == "*" and value * 2 > 10 * hi:
            op = "-"
        if op == "+":
            n = rng.randint(1, hi)
            template, result = rng.choice(_ADD), value + n
        elif op == "-":
            n = rng.randint(1, value - 1)
            template, result = rng.choice(_SUB), value - n
        elif op == "*":
            n = rng.randint(2, 5)
            template, result = rng.choice(_MUL), value * n
        else:
            n = rng.choice(divisors)
            template, result = rng.choice(_DIV), value // n
        sentences.append(template.format(who=name, n=n, items=items))
        symbol = {"+": "+", "-": "-", "*": "*", "/": "/"}[op]
        work.append(f"{value} {symbol} {n} = {result}")
        value = result
    question = " ".join(sentences) + f" How many {items} does {name} have now?"
    solution = "\n".join(work) + f"\nAnswer: {value}"
    return Problem(question=question, answer=value, solution=solution, level=level, steps=tuple(work))


def generate_problems(n: int, level: int, seed: int) -> list[Problem]:
    """`n` problems of one level, reproducible from `seed` (unique question texts)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_level(level)
    rng = random.Random(f"sparse-opd-arithmetic/{level}/{seed}")
    problems, seen = [], set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct level-{level} problems; ask for fewer")
        problem = make_problem(rng, level)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def user_message(question: str) -> str:
    """The student's user turn for a question."""
    return f"{question}\n{INSTRUCTION}"


def privileged_message(question: str, solution: str, context: str, examples: list[Problem] | None = None) -> str:
    """The teacher's user turn: the question plus privileged information the student never sees.

    `context="solution"` shows the worked reference solution; `"examples"` shows worked examples of other problems
    of the same kind (few-shot); `"both"` shows both.
    """
    if context not in ("solution", "examples", "both"):
        raise ValueError(f"unknown teacher context {context!r}; choose 'solution', 'examples' or 'both'")
    parts = []
    if context in ("examples", "both"):
        if not examples:
            raise ValueError("the 'examples' teacher context needs at least one worked example")
        for example in examples:
            parts.append(f"Example problem: {example.question}\nExample solution:\n{example.solution}")
    if context in ("solution", "both"):
        parts.append(f"Reference solution (check your work against it):\n{solution}")
    return "\n\n".join(parts) + f"\n\nNow the problem.\n{user_message(question)}"
