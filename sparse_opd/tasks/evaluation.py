"""Greedy batched generation on held-out rows, scored by a metric (the packaged `math_accuracy` by default)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .generation import generate_completions
from .scoring import PACKAGED, load_scorer


@dataclass
class EvalResult:
    """Scores of one model on one dataset.

    `accuracy` is the metric's headline score (for `math_accuracy`: the answer found as the benchmark's users find
    it, see `sparse_opd.tasks.answers`); `strict_accuracy` and `format_error_rate` are the strict `Answer: <n>`
    format's accuracy and miss rate (None for a metric without them); `correct` holds the per-example scores that
    gains are paired on; `scores` every number the metric returned.
    """

    accuracy: float
    format_error_rate: float | None
    num_examples: int
    seconds: float
    completions: list[str] = field(default_factory=list, repr=False)
    correct: list = field(default_factory=list, repr=False)
    strict_accuracy: float | None = None
    metric: str = PACKAGED
    scores: dict = field(default_factory=dict, repr=False)

    @property
    def stderr(self) -> float:
        """Standard error of `accuracy`: binomial for 0/1 scores, the sample one for other per-example scores."""
        n = max(self.num_examples, 1)
        if self.correct and any(float(c) not in (0.0, 1.0) for c in self.correct):
            mean = sum(map(float, self.correct)) / len(self.correct)
            var = sum((float(c) - mean) ** 2 for c in self.correct) / max(len(self.correct) - 1, 1)
            return math.sqrt(var / len(self.correct))
        if not 0 <= self.accuracy <= 1:
            return math.nan
        return math.sqrt(self.accuracy * (1 - self.accuracy) / n)

    def gain_over(self, other: EvalResult) -> tuple[float, float]:
        """``(accuracy - other.accuracy, paired standard error)`` on the same problems in the same order."""
        if not self.correct or not other.correct:
            raise ValueError(f"metric {self.metric} gives no per-example scores, so no paired gain; return one score "
                             "per example from the metric")
        return paired_difference(other.correct, self.correct)

    def __str__(self) -> str:
        if self.metric == PACKAGED:
            text = f"accuracy {100 * self.accuracy:.1f}% +/- {100 * self.stderr:.1f} (n={self.num_examples})"
            if self.format_error_rate is not None:
                text += f", format errors {100 * self.format_error_rate:.1f}%"
            if self.strict_accuracy is not None:
                text += f" (accuracy in the strict 'Answer: <n>' format {100 * self.strict_accuracy:.1f}%)"
            return text
        return f"{self.metric} {self.accuracy:.4g} +/- {self.stderr:.2g} (n={self.num_examples})"


def paired_difference(before: list, after: list) -> tuple[float, float]:
    """Mean of ``after - before`` over paired per-example scores, with its standard error."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired scores need the same, non-zero number of problems; got {len(before)} and "
                         f"{len(after)}")
    d = [float(b) - float(a) for a, b in zip(before, after)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
    return mean, math.sqrt(var / len(d))


def on_every_rank(items: list, compute, progress: str | None = None) -> list:
    """``compute(shard, progress)`` on this rank's contiguous shard of `items`, the results of all ranks gathered in
    order, so every rank returns the list for all items (one process: ``compute(items, progress)``)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
    if world == 1:
        return compute(items, progress)
    per, extra = divmod(len(items), world)
    start = rank * per + min(rank, extra)
    shard = items[start : start + per + (rank < extra)]
    results = compute(shard, progress if rank == 0 else None)  # one progress bar, on the main process
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, results)
    return [r for part in gathered for r in part]


def evaluate_model(
    model,
    tokenizer,
    dataset,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    batch_size: int = 32,
    max_new_tokens: int = 96,
    metric=None,
    progress: str | None = None,
    chat_template_kwargs: dict | None = None,
    generation_context=None,
) -> EvalResult:
    """Generate greedily for every row of `dataset` and score the completions against `answer_column`.

    Args:
        metric: `None` (the packaged `math_accuracy`), a local `evaluate` module, `"package.module:function"`, a
            callable or a loaded `evaluate` module; see `sparse_opd.tasks.scoring`.
        progress: a label for a progress bar over the batches.
        chat_template_kwargs: passed to `apply_chat_template` (e.g. ``{"enable_thinking": False}`` for Qwen3).
        generation_context: a function of the model returning a context manager to generate under (e.g.
            `sparse_opd.tuner.merged_sparse_delta`); by default the model generates as it is.

    Under `torch.distributed`, each rank generates for its contiguous shard and the completions are gathered, so
    every rank returns the same result for the whole dataset.
    """
    for column in (prompt_column, answer_column):
        if column not in dataset.column_names:
            raise ValueError(f"column {column!r} is not in the dataset (columns: {dataset.column_names})")
    scorer = load_scorer(metric)
    start = time.perf_counter()

    def generate(prompts, bar):
        return generate_completions(model, tokenizer, prompts, batch_size, max_new_tokens, chat_template_kwargs,
                                    bar, generation_context)

    completions = on_every_rank(list(dataset[prompt_column]), generate, progress)
    references = list(dataset[answer_column])
    scores = scorer(completions, [str(a) for a in references] if scorer.packaged else references)
    values = scores.values
    return EvalResult(
        accuracy=scores.score,
        format_error_rate=values.get("format_error_rate"),
        num_examples=len(completions),
        seconds=time.perf_counter() - start,
        completions=completions,
        correct=scores.per_example or [],
        strict_accuracy=values.get("strict_accuracy"),
        metric=scorer.name,
        scores=values,
    )
