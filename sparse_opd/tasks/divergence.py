"""What on-policy distillation optimizes, measured on held-out prompts: the teacher-student divergence on the
student's own samples.

For each prompt the student samples completions with the training's generation settings; both models then score
those tokens (the teacher after its own, possibly privileged, prompt) and the per-token generalized Jensen-Shannon
divergence of their next-token distributions at `temperature` is averaged over the completion's tokens (its stop
token included), as in `trl.DistillationTrainer`'s loss:

    beta = 1: KL(student || teacher)      beta = 0: KL(teacher || student)
    0 < beta < 1: beta KL(teacher || m) + (1 - beta) KL(student || m),  m = (1 - beta) student + beta teacher

Run before and after training on the same prompts, the per-prompt means pair up: `after.change_from(before)` is the
mean change with its paired standard error. Lower is closer to the teacher.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .evaluation import on_every_rank, paired_difference
from .generation import generate_ids, left_pad, tokenize_prompts


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 1.0,
                    temperature: float = 1.0) -> torch.Tensor:
    """Per-position divergence (nats) between two ``[..., V]`` logit tensors; the formula is in the module docstring.
    Computed in float32."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)} (the models need the same vocabulary)")
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 1.0:
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    if beta == 0.0:
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    log_m = torch.logaddexp(log_s + math.log(1 - beta), log_t + math.log(beta))
    to_teacher = (log_t.exp() * (log_t - log_m)).sum(-1)
    to_student = (log_s.exp() * (log_s - log_m)).sum(-1)
    return beta * to_teacher + (1 - beta) * to_student


def divergence_name(beta: float) -> str:
    if beta == 1.0:
        return "KL(student || teacher)"
    if beta == 0.0:
        return "KL(teacher || student)"
    return f"generalized JSD (beta={beta:g})"


@dataclass
class DivergenceResult:
    """Mean per-token teacher-student divergence over held-out prompts (each prompt's mean over its sampled
    completions' tokens), with the standard error over prompts."""

    mean: float
    stderr: float
    num_prompts: int
    num_tokens: int
    beta: float
    temperature: float
    seconds: float
    per_prompt: list[float] = field(default_factory=list, repr=False)
    completions: list[str] = field(default_factory=list, repr=False)

    def change_from(self, before: DivergenceResult) -> tuple[float, float]:
        """``(self.mean - before.mean, paired standard error)`` over the same prompts; negative is closer to the
        teacher."""
        if (before.beta, before.temperature) != (self.beta, self.temperature):
            raise ValueError("the two divergences were measured with different beta/temperature; measure both alike")
        return paired_difference(before.per_prompt, self.per_prompt)

    def __str__(self) -> str:
        return (f"{divergence_name(self.beta)} {self.mean:.4f} +/- {self.stderr:.4f} nats/token "
                f"(n={self.num_prompts} prompts, {self.num_tokens} sampled tokens)")


def _teacher_scope(student, teacher):
    """``(model, context factory)`` for the teacher's forward: a separate model, or the student inside `teacher()`
    (e.g. ``student.disable_adapter``: its base weights)."""
    if isinstance(teacher, torch.nn.Module):
        return teacher, contextlib.nullcontext
    if callable(teacher):
        return student, teacher
    raise TypeError("teacher must be a model, or a function returning a context manager under which the student is "
                    f"the teacher (e.g. student.disable_adapter); got {type(teacher).__name__}")


def _completion_logits(model, prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int):
    """Logits ``[B, K, V]`` the model gives each completion token (after its prompt), and the ``[B, K]`` mask of
    real completion tokens."""
    device = next(model.parameters()).device
    prompts, prompt_mask = left_pad(prompt_ids, pad_id)
    width = max(len(c) for c in completions)
    tail = torch.full((len(completions), width), pad_id, dtype=torch.long)
    tail_mask = torch.zeros_like(tail)
    for i, c in enumerate(completions):
        tail[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        tail_mask[i, : len(c)] = 1
    ids, mask = torch.cat([prompts, tail], 1).to(device), torch.cat([prompt_mask, tail_mask], 1).to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=width + 1).logits
    return logits[:, :width], tail_mask.to(device)


@contextlib.contextmanager
def _eval_mode(*models):
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@torch.no_grad()
def completion_divergence(student, teacher, prompt_ids: list[list[int]], teacher_prompt_ids: list[list[int]],
                          completion_ids: list[list[int]], pad_id: int, beta: float = 1.0, temperature: float = 1.0,
                          batch_size: int = 8) -> list[tuple[float, int]]:
    """``(summed per-token divergence, number of tokens)`` of each given completion: the student scores it after
    its prompt, the teacher (a model, or a context factory as in `teacher_student_divergence`) after its own."""
    if not len(prompt_ids) == len(teacher_prompt_ids) == len(completion_ids):
        raise ValueError("prompt_ids, teacher_prompt_ids and completion_ids need one entry per completion")
    teacher_model, teacher_context = _teacher_scope(student, teacher)
    out = []
    with _eval_mode(student, teacher_model):
        for start in range(0, len(completion_ids), batch_size):
            rows = range(start, min(start + batch_size, len(completion_ids)))
            completions = [completion_ids[r] or [pad_id] for r in rows]
            s_logits, mask = _completion_logits(student, [prompt_ids[r] for r in rows], completions, pad_id)
            with teacher_context():
                t_logits, _ = _completion_logits(teacher_model, [teacher_prompt_ids[r] for r in rows], completions,
                                                 pad_id)
            per_token = generalized_jsd(s_logits, t_logits.to(s_logits.device), beta, temperature) * mask
            out += [(float(per_token[i].sum()), int(mask[i].sum())) for i in range(len(rows))]
    return out


@torch.no_grad()
def teacher_student_divergence(
    student,
    teacher,
    tokenizer,
    prompts: list,
    teacher_prompts: list | None = None,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    beta: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    chat_template_kwargs: dict | None = None,
    generation_context=None,
    progress: str | None = None,
) -> DivergenceResult:
    """The held-out teacher-student divergence on the student's own samples (see the module docstring).

    Args:
        teacher: a model with the student's vocabulary, or a function returning a context manager under which the
            student itself is the teacher (``student.disable_adapter`` for its base weights).
        prompts: chat-message lists or strings, as the trainer reads them.
        teacher_prompts: what the teacher sees instead, row for row (a privileged context); default `prompts`.
        max_new_tokens, temperature, top_p, top_k: the training's generation settings (temperature also sets the
            divergence's softmax temperature, as in training).
        beta: TRL's `beta` (1: reverse KL, 0: forward KL, between: generalized JSD).
        num_samples: sampled completions per prompt.
        seed: the sampling seed (the caller's random state is left as it was).
        generation_context: a function of the student returning a context manager to sample under (e.g.
            `sparse_opd.tuner.merged_sparse_delta`); scoring runs outside it.

    Under `torch.distributed` each rank takes a contiguous shard of the prompts and the results are gathered.
    """
    if teacher_prompts is not None and len(teacher_prompts) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(teacher_prompts)} teacher prompts; give one per prompt")
    if not prompts:
        raise ValueError("no prompts to measure the divergence on")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    _teacher_scope(student, teacher)  # argument checks before any work
    generalized_jsd(torch.zeros(1, 1), torch.zeros(1, 1), beta, temperature)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    started = time.perf_counter()
    pairs = list(zip(prompts, teacher_prompts if teacher_prompts is not None else prompts))

    def measure(shard, bar):
        student_ids = tokenize_prompts(tokenizer, [p for p, _ in shard], chat_template_kwargs)
        teacher_ids = tokenize_prompts(tokenizer, [t for _, t in shard], chat_template_kwargs)
        repeated = [ids for ids in student_ids for _ in range(num_samples)]
        teacher_repeated = [ids for ids in teacher_ids for _ in range(num_samples)]
        devices = [torch.device("cuda", torch.cuda.current_device())] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if distributed else 0
            torch.manual_seed(seed + 1_000_003 * rank)
            samples = generate_ids(student, tokenizer, repeated, max_new_tokens, batch_size, sampling,
                                   generation_context, bar)
        scored = completion_divergence(student, teacher, repeated, teacher_repeated, samples, tokenizer.pad_token_id,
                                       beta, temperature, batch_size)
        return [(total, count, tokenizer.decode(ids, skip_special_tokens=True))
                for (total, count), ids in zip(scored, samples)]

    measured = on_every_rank(pairs, measure, progress)
    per_prompt, tokens, texts = [], 0, []
    for p in range(len(pairs)):
        group = measured[p * num_samples : (p + 1) * num_samples]
        per_prompt.append(sum(total / max(count, 1) for total, count, _ in group) / num_samples)
        tokens += sum(count for _, count, _ in group)
        texts += [text for _, _, text in group]
    n = len(per_prompt)
    mean = sum(per_prompt) / n
    var = sum((x - mean) ** 2 for x in per_prompt) / max(n - 1, 1)
    return DivergenceResult(mean=mean, stderr=math.sqrt(var / n), num_prompts=n, num_tokens=tokens, beta=beta,
                            temperature=temperature, seconds=time.perf_counter() - started, per_prompt=per_prompt,
                            completions=texts)
