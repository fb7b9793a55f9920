"""The job's evaluation: what can be scored and with which metric, how long an answer may be, greedy answers scored
before and after training, and the held-out teacher-student divergence (what on-policy distillation minimizes) when
the answers cannot be scored or --eval_divergence asks for it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .arguments import Arguments


@dataclass(frozen=True)
class Plan:
    """How the job evaluates a run: the metric that scores the answers (`scored` False: none can), whether the
    teacher-student divergence is measured, and the reason, in one line, to print."""

    scored: bool
    metric: str | None  # None: the packaged math_accuracy (when scored)
    divergence: bool
    reason: str


def plan(args: Arguments, test) -> Plan:
    """What the held-out rows allow: numeric answers are scored by the packaged metric (or --metric), text answers
    by --metric only, rows without answers not at all; the divergence is measured when nothing is scored, or when
    --eval_divergence says so. `--metric` on data without answers is refused here, before any model loads."""
    from ..tasks import answers_are_numbers

    job = args.job
    has_answers = "answer" in test.column_names
    if not has_answers and job.metric is not None:
        raise ValueError(f"--metric {job.metric} scores answers against references, but the held-out rows have none; "
                         "add an answer column (--answer_column) or drop --metric")
    numeric = has_answers and answers_are_numbers(test)
    scored = numeric or (has_answers and job.metric is not None)
    divergence = job.eval_divergence if job.eval_divergence is not None else not scored
    what = "the teacher-student divergence on the student's own samples (what on-policy distillation minimizes)"
    measured = (f"the job measures {what} before and after training" if divergence else
                "--eval_divergence false: nothing is evaluated")
    if not has_answers:
        reason = f"the data has no reference answers: {measured}"
    elif not scored:
        reason = f"the reference answers are text and no --metric says how to score them: {measured}"
    else:
        by = (f"--metric {job.metric}" if job.metric is not None else
              "the final number, as the benchmark's users score it, beside the strict 'Answer: <n>' format")
        reason = f"answers scored by {by}" + (f"; also {what}" if divergence else "")
    return Plan(scored, job.metric, divergence, f"evaluation: {reason}")


def worked_solutions(dataset) -> list[str]:
    """The reference solutions with working that a dataset shows its teacher (all of them for the synthetic task)."""
    if dataset is None or "solution" not in dataset.column_names:
        return []
    if "worked_solution" not in dataset.column_names:
        return list(dataset["solution"])
    return [s for s, worked in zip(dataset["solution"], dataset["worked_solution"]) if worked]


def answer_length(args: Arguments, tokenizer, train, test, limit: int = 2000):
    """New tokens per evaluation answer (`GenerationLength`, with its reason): --eval_max_new_tokens, else from the
    worked reference solutions' token lengths (`sparse_opd.tasks.generation_length`), else --max_completion_length."""
    from ..tasks import GenerationLength, generation_length

    tokens = args.job.eval_max_new_tokens
    if tokens is not None:
        return GenerationLength(tokens, f"{tokens} new tokens (--eval_max_new_tokens)")
    references = [*worked_solutions(train), *worked_solutions(test)][:limit]
    length = generation_length(tokenizer, references, fallback=args.training.max_completion_length)
    if length.max_new_tokens == args.training.max_completion_length and len(references) < 8:
        reason = length.reason.replace("(fallback:", "(--max_completion_length:")
        return GenerationLength(length.max_new_tokens, reason)
    return length


def evaluate(model, tokenizer, dataset, args: Arguments, prompt_column: str = "prompt", desc: str | None = None,
             trainer=None, max_new_tokens: int | None = None):
    """Greedy answers to the held-out rows (rendered with `--chat_template_kwargs`, as in training), scored by
    --metric or the packaged `math_accuracy` (`EvalResult`), each answer up to ``max_new_tokens`` (default:
    `answer_length` of ``dataset``); ``desc`` labels a progress bar (None: no bar). Pass the
    ``trainer`` once it has trained the model: its sparse delta generates merged where that is exact (DeepSpeed /
    FSDP wrap it; its weights are gathered)."""
    from ..tasks import evaluate_model
    from ..tuner import merged_sparse_delta

    job = args.job
    with ready_for_generation(model, trainer) as ready:
        return evaluate_model(ready, tokenizer, dataset, prompt_column=prompt_column, batch_size=job.eval_batch_size,
                              max_new_tokens=max_new_tokens or int(answer_length(args, tokenizer, None, dataset)),
                              metric=job.metric, progress=desc,
                              chat_template_kwargs=args.training.chat_template_kwargs,
                              generation_context=merged_sparse_delta if trainer is not None else None)


def teacher_reads_privileged_context(teacher, config) -> bool:
    """Whether the teacher scores after the privileged prompt: the student's base weights always, a separate teacher
    with --teacher_privileged_context."""
    return teacher is None or bool(config.teacher_privileged_context)


def teacher_prompt_column(config) -> str:
    return config.teacher_prompt_column or "teacher_prompt"


def evaluate_teacher(student, teacher, tokenizer, test, args: Arguments, desc: str | None = None,
                     max_new_tokens: int | None = None):
    """The teacher's score on the held-out rows, shown what it is shown during training (its privileged prompt when
    it reads one: `--teacher_prompt_column`, or the column `with_teacher_prompts` built from
    `--teacher_prompt_template`)."""
    config = args.training
    column = teacher_prompt_column(config) if teacher_reads_privileged_context(teacher, config) else "prompt"
    return evaluate(teacher if teacher is not None else student, tokenizer, test, args, column, desc,
                    max_new_tokens=max_new_tokens)


def divergence(student, teacher, tokenizer, test, args: Arguments, trainer=None, desc: str | None = None):
    """The held-out teacher-student divergence on the student's own samples (`DivergenceResult`), with the
    training's generation settings (--max_completion_length, --temperature, --top_p, --top_k), its --beta and
    --seed, so that the measurements before and after training pair up prompt by prompt.

    The teacher is the separate teacher model, or the student's own base weights: before training the plain student,
    after it (``trainer`` given) the trained model with its adapter disabled. It reads the privileged prompts when it
    does so in training. Under DeepSpeed ZeRO-3 both models are gathered for the measurement."""
    from ..tasks import teacher_student_divergence
    from ..tuner import merged_sparse_delta

    config = args.training
    column = teacher_prompt_column(config)
    privileged = teacher_reads_privileged_context(teacher, config) and column in test.column_names
    with contextlib.ExitStack() as stack:
        ready = stack.enter_context(ready_for_generation(student, trainer))
        if teacher is not None:
            judge = stack.enter_context(ready_for_generation(teacher))
        else:
            judge = ready.disable_adapter if trainer is not None else ready
        return teacher_student_divergence(
            ready, judge, tokenizer, list(test["prompt"]), list(test[column]) if privileged else None,
            max_new_tokens=config.max_completion_length, temperature=config.temperature, top_p=config.top_p,
            top_k=config.top_k or 0, beta=config.beta, seed=config.seed, batch_size=args.job.eval_batch_size,
            chat_template_kwargs=config.chat_template_kwargs,
            generation_context=merged_sparse_delta if trainer is not None else None, progress=desc)


@contextlib.contextmanager
def ready_for_generation(model, trainer=None):
    """``model``, whole: under DeepSpeed ZeRO-3 its weights are partitions until gathered. A trained model goes
    through TRL's `unwrap_model_for_generation` (gathers and lifts the engine's hooks); a model no engine holds yet
    (before training, or a teacher) is gathered with `deepspeed.zero.GatheredParameters`."""
    from ..distributed import gathered, is_zero3_param

    if trainer is not None:
        from trl.models import unwrap_model_for_generation

        with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as unwrapped:
            yield unwrapped
        return
    params = list(model.parameters())
    if not any(is_zero3_param(p) for p in params):
        yield model
        return
    with gathered(params):
        yield model
