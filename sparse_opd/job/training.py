"""The job's trainer: `SparseOPDTrainer` over the loaded models, with one progress bar per phase, and the save."""

from __future__ import annotations

import os

from .arguments import Arguments
from .console import say


def make_trainer(student, teacher, tokenizer, train, test, args: Arguments):
    """`SparseOPDTrainer` with the job's progress display (one bar per phase, metrics in the bar, none with
    --disable_tqdm); the held-out problems are its eval set when --eval_strategy asks for evaluation during
    training. Prints how training is distributed."""
    from ..trainer import SparseOPDTrainer
    from ..trainer.progress import PhaseProgress

    job, config = args.job, args.training
    # the job loaded the models with --model_init_kwargs / --teacher_model_init_kwargs already; the trainer, handed
    # models rather than names, refuses init kwargs it cannot apply
    config.model_init_kwargs = config.teacher_model_init_kwargs = None
    callbacks = [] if job.verbose or config.disable_tqdm else [PhaseProgress("training")]
    trainer = SparseOPDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=train,
                               eval_dataset=test if config.eval_strategy != "no" else None,
                               processing_class=tokenizer, callbacks=callbacks)
    if not job.verbose:
        PhaseProgress.replace_default(trainer)
    say(f"training: {distribution(trainer)}")
    return trainer


def distribution(trainer) -> str:
    """How training is distributed, in words: "1 process, fp32", "2 processes, FSDP2, bf16", ..."""
    accelerator, dtype = trainer.accelerator, "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32"
    if accelerator.num_processes == 1:
        return f"1 process, {dtype}"
    kind = {"MULTI_CPU": "DDP", "MULTI_GPU": "DDP", "FSDP": "FSDP"}.get(accelerator.distributed_type.value,
                                                                       accelerator.distributed_type.value)
    if accelerator.is_fsdp2:
        kind = "FSDP2"
    elif kind == "DEEPSPEED":
        kind = f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    elif os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and kind != "FSDP":
        kind += " (accelerate runs an FSDP config as DDP on the CPU)"
    return f"{accelerator.num_processes} processes, {kind}, {dtype}"


def save(trainer, results: dict, task: str, divergences: dict | None = None, answer_length=None) -> None:
    """Save the adapter with a model card stating the task, teacher, mask, steps, the scores and divergences before
    and after, and a plain line when the student got worse beyond noise (or push both)."""
    from .summary import regressions

    evaluation = f"greedy answers, {answer_length.reason}" if answer_length is not None else None
    trainer.model_card_details.update(task=task, results=results, divergences=divergences or None,
                                      regressions=regressions(results, divergences), evaluation=evaluation)
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message="Sparse OPD adapter")  # saves the adapter and writes the card first
    else:
        trainer.save_model(trainer.args.output_dir)
        trainer.create_model_card()
