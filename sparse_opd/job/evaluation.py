"""The job's accuracy evaluation: greedy answers to the held-out problems, scored by the packaged metric."""

from __future__ import annotations

import contextlib

from .arguments import Arguments


def evaluate(model, tokenizer, dataset, args: Arguments, prompt_column: str = "prompt", desc: str | None = None,
             trainer=None):
    """Greedy answers to the held-out problems (rendered with `--chat_template_kwargs`, as in training), scored by the
    packaged `math_accuracy` metric (`EvalResult`); ``desc`` labels a progress bar (None: no bar). Pass the
    ``trainer`` once it has prepared the model (DeepSpeed / FSDP wrap it)."""
    from ..tasks import evaluate_model
    from ..tuner import merged_sparse_delta  # a sparse delta generates fastest merged (exactly undone)

    job = args.job
    with ready_for_generation(model, trainer) as ready:
        return evaluate_model(ready, tokenizer, dataset, prompt_column=prompt_column, batch_size=job.eval_batch_size,
                              max_new_tokens=job.eval_max_new_tokens, progress=desc,
                              chat_template_kwargs=args.training.chat_template_kwargs,
                              generation_context=merged_sparse_delta)


def evaluate_teacher(student, teacher, tokenizer, test, args: Arguments, desc: str | None = None):
    """The teacher's accuracy on the held-out problems, shown what it is shown during training (its privileged
    prompt when it reads one: `--teacher_prompt_column`, or the column `with_teacher_prompts` built from
    `--teacher_prompt_template`)."""
    config = args.training
    column = config.teacher_prompt_column or "teacher_prompt"
    if teacher is None:
        return evaluate(student, tokenizer, test, args, column, desc)
    return evaluate(teacher, tokenizer, test, args, column if config.teacher_privileged_context else "prompt", desc)


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
