"""The job's data: the synthetic task, or a user's data (question/answer rows or prompts in TRL's formats, with or
without reference answers), with a held-out split it never trains on, the teacher's privileged prompts, and how the
run describes both."""

from __future__ import annotations

import os

from .arguments import JobArguments
from .console import say


def load_data(job: JobArguments):
    """``(train, eval)`` datasets in the trainer's format (`sparse_opd.tasks.prepare_dataset`): a `prompt` column, and
    with reference answers `answer`, `solution`, `worked_solution` and the teacher's `teacher_prompt`; no eval row is
    ever trained on. A dataset with no usable prompt column ends here, in one line, before any model loads."""
    from ..tasks import arithmetic_dataset, prepare_dataset
    from ..tasks.data import load_qa_dataset

    if job.dataset_name is None:
        train = arithmetic_dataset("train", job.num_train, job.level, teacher_context=job.teacher_context)
        test = arithmetic_dataset("test", job.num_eval, job.level, teacher_context=job.teacher_context)
        return train, test
    if job.teacher_context not in ("solution", "none"):
        raise ValueError(f"--teacher_context {job.teacher_context} is only available for the synthetic task")
    keep = {"question_column": job.question_column, "prompt_column": job.prompt_column,
            "answer_column": job.answer_column, "solution_column": job.solution_column,
            "teacher_context": job.teacher_context, "on_unparseable": job.on_unparseable}
    raw_train = load_qa_dataset(job.dataset_name, job.dataset_train_split, job.dataset_config)
    if job.eval_dataset_name is not None:
        raw_eval = load_qa_dataset(job.eval_dataset_name, job.dataset_test_split, job.dataset_config)
    else:
        raw_eval = _test_split(job)
    if raw_eval is None:  # one file: prepare it, then hold out num_eval rows and train on the others
        data = prepare_dataset(raw_train, name=job.dataset_name, **keep)
        say(data.info.description)
        if len(data) <= job.num_eval:
            raise ValueError(f"{job.dataset_name} has {len(data)} usable rows, not more than --num_eval "
                             f"{job.num_eval}: pass --eval_dataset_name or lower --num_eval")
        split = data.train_test_split(test_size=job.num_eval, seed=0)
        say(f"held out {len(split['test'])} rows of {job.dataset_name} for evaluation; training on the other "
            f"{len(split['train'])}")
        return split["train"], split["test"]
    train = prepare_dataset(raw_train, name=f"{job.dataset_name} (train)", **keep)
    test = prepare_dataset(raw_eval.select(range(min(job.num_eval, len(raw_eval)))),
                           name=f"{job.eval_dataset_name or job.dataset_name} (eval)", **keep)
    for part in (train, test):
        say(part.info.description)
    return train, test


def _test_split(job: JobArguments):
    if os.path.isfile(job.dataset_name):
        return None
    from datasets import get_dataset_split_names

    if job.dataset_test_split in get_dataset_split_names(job.dataset_name, job.dataset_config):
        from ..tasks.data import load_qa_dataset

        return load_qa_dataset(job.dataset_name, job.dataset_test_split, job.dataset_config)
    return None


def with_teacher_prompts(dataset, config):
    """``dataset`` with the teacher's prompts where the trainer reads them: a `--teacher_prompt_template` rebuilds the
    `teacher_prompt` column from each row, and the column is renamed to `--teacher_prompt_column`."""
    from ..trainer.teachers import build_teacher_prompt

    if config.teacher_prompt_template is not None:
        template = config.teacher_prompt_template
        dataset = dataset.map(lambda row: {"teacher_prompt": build_teacher_prompt(row, None, template)})
    column = config.teacher_prompt_column
    if column is not None and column != "teacher_prompt" and "teacher_prompt" in dataset.column_names:
        dataset = dataset.rename_column("teacher_prompt", column)
    return dataset


def check_teacher(args, data) -> None:
    """Without a separate teacher, the student's own base weights teach from a privileged context; data that gives them
    none (no reference answers, or --teacher_context none) ends here, in one line, before any model loads."""
    config = args.training
    column = config.teacher_prompt_column
    if (config.teacher_model_name_or_path is not None or config.teacher_prompt_template is not None
            or (column is not None and column in data.column_names)):
        return
    why = ("the data has no reference answers to show them" if "answer" not in data.column_names
           else f"--teacher_context {args.job.teacher_context} shows them nothing")
    raise ValueError(f"no teacher: without --teacher_model_name_or_path the teacher is the student's own base weights "
                     f"reading a privileged context, and {why}; pass --teacher_model_name_or_path, or give the data a "
                     f"{column or 'teacher_prompt'!r} column or --teacher_prompt_template")


def task_description(job: JobArguments) -> str:
    if job.dataset_name is None:
        return f"synthetic arithmetic word problems, level {job.level} (sparse_opd.tasks)"
    return job.dataset_name + (f" ({job.dataset_config})" if job.dataset_config else "")


def teacher_sees(job: JobArguments, config, teacher, data) -> str:
    """In words, what the teacher is shown (printed before training)."""
    if teacher is not None and not config.teacher_privileged_context:
        return f"{config.teacher_model_name_or_path}, shown the student's own prompt (standard on-policy distillation)"
    who = config.teacher_model_name_or_path or "the student's base weights"
    if config.teacher_prompt_template is not None:
        return f"{who}, shown --teacher_prompt_template (on-policy context distillation)"
    if job.dataset_name is None:
        return f"{who}, shown the reference {job.teacher_context} (on-policy context distillation)"
    if "worked_solution" not in data.column_names:
        return f"{who}, shown the data's {config.teacher_prompt_column or 'teacher_prompt'!r} column"
    worked = sum(data["worked_solution"])
    return (f"{who}, shown the reference solution ({worked} of {len(data)} rows have a worked solution; the others "
            "show the final answer only)")
