"""Greedy batched generation and scoring with the packaged `evaluate` metric."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..tuner import merged_sparse_delta  # a sparse delta generates fastest merged (exactly undone)

METRIC_DIR = Path(__file__).parent / "metrics" / "math_accuracy"


def metric_path() -> str:
    """Local path of the `math_accuracy` metric module, for `evaluate.load(metric_path())` (works offline)."""
    return str(METRIC_DIR)


def load_metric():
    """The `math_accuracy` metric, loaded by local path."""
    import evaluate

    return evaluate.load(metric_path())


@dataclass
class EvalResult:
    """Scores of one model on one dataset. `stderr` is the binomial standard error of `accuracy`."""

    accuracy: float
    format_error_rate: float
    num_examples: int
    seconds: float
    completions: list[str] = field(default_factory=list, repr=False)
    correct: list[bool] = field(default_factory=list, repr=False)

    @property
    def stderr(self) -> float:
        p, n = self.accuracy, max(self.num_examples, 1)
        return math.sqrt(p * (1 - p) / n)

    def gain_over(self, other: EvalResult) -> tuple[float, float]:
        """``(accuracy - other.accuracy, paired standard error)`` on the same problems in the same order."""
        return paired_difference(other.correct, self.correct)

    def __str__(self) -> str:
        return (
            f"accuracy {100 * self.accuracy:.1f}% +/- {100 * self.stderr:.1f} (n={self.num_examples}), "
            f"format errors {100 * self.format_error_rate:.1f}%"
        )


def paired_difference(before: list, after: list) -> tuple[float, float]:
    """Mean of ``after - before`` over paired per-problem scores (0/1), with its standard error."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired scores need the same, non-zero number of problems; got {len(before)} and "
                         f"{len(after)}")
    d = [float(b) - float(a) for a, b in zip(before, after)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1)
    return mean, math.sqrt(var / len(d))


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: list,
    batch_size: int = 32,
    max_new_tokens: int = 96,
    chat_template_kwargs: dict | None = None,
    progress: str | None = None,
) -> list[str]:
    """Greedy completions for conversational (list of messages) or plain-text prompts, in the order given.

    Prompts are batched by length (less padding), left-padded, and decoded without special tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {}))
        if isinstance(p, list)
        else p
        for p in prompts
    ]
    encoded = [tokenizer(t, add_special_tokens=not isinstance(p, list))["input_ids"] for t, p in zip(texts, prompts)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    was_training = model.training
    model.eval()
    outputs: list[str | None] = [None] * len(prompts)
    with contextlib.ExitStack() as stack:
        stack.enter_context(merged_sparse_delta(model))
        stack.callback(model.train, was_training)
        starts = range(0, len(order), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=progress, unit="batch", dynamic_ncols=True)
        for start in starts:
            batch = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row, i in enumerate(batch):
                outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
    return outputs


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
) -> EvalResult:
    """Generate greedily for every row of `dataset` and score with the `math_accuracy` metric (`progress`: a label
    for a progress bar over the batches).

    Under `torch.distributed`, each rank generates for its contiguous shard and the completions are gathered, so
    every rank returns the same result for the whole dataset.
    """
    for column in (prompt_column, answer_column):
        if column not in dataset.column_names:
            raise ValueError(f"column {column!r} is not in the dataset (columns: {dataset.column_names})")
    start = time.perf_counter()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
    shard = dataset.shard(world, rank, contiguous=True) if world > 1 else dataset
    if progress and rank != 0:
        progress = None  # one bar, on the main process
    completions = generate_completions(model, tokenizer, shard[prompt_column], batch_size, max_new_tokens,
                                       progress=progress)
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, completions)
        completions = [c for part in gathered for c in part]
    per_example = {"per_example": True} if metric is None else {}  # a user's metric may not take the flag
    metric = metric if metric is not None else load_metric()
    scores = metric.compute(predictions=completions, references=[str(a) for a in dataset[answer_column]],
                            **per_example)
    return EvalResult(
        accuracy=scores["accuracy"],
        format_error_rate=scores["format_error_rate"],
        num_examples=scores["num_examples"],
        seconds=time.perf_counter() - start,
        completions=completions,
        correct=scores.get("correct", []),
    )
