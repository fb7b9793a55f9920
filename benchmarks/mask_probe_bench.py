"""How well does a probe of N steps predict the coordinates a longer run moves most? (embedded SmolLM2-135M)

    python benchmarks/mask_probe_bench.py [--full-steps 30] [--probe-steps 1 3 8] [--density 0.05]

A full-parameter AdamW run on the synthetic arithmetic task (causal-LM loss on question + worked solution) is the
reference: its mask is the `density` fraction of coordinates with the largest |W_end - W_start| per module (at this
learning rate nearly every coordinate moves by more than 1e-5, so a threshold mask would be almost dense; the top-k
form is the comparable one). Each probe starts from the same base, sees the same first N batches, and keeps the same
per-module counts by its statistic. Reported: precision (= recall, equal sizes) and Jaccard against the reference,
and the lift over a random mask of the same size (precision / density).
"""

from __future__ import annotations

import argparse
import time

import torch

DEFAULT_LR = 1e-5


def build_dataset(tokenizer, n: int, seed: int):
    from datasets import Dataset

    from sparse_opd.tasks import generate_problems

    texts = [f"Question: {p.question}\nSolution: {p.solution}\nAnswer: {p.answer}" for p in
             generate_problems(n, level=2, seed=seed)]
    enc = tokenizer(texts, truncation=True, max_length=96)
    return Dataset.from_dict({"input_ids": enc["input_ids"]})


def run(steps: int, statistic: str, lr: float, data, tokenizer, workdir: str):
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from sparse_opd.embedded import embedded_model_path
    from sparse_opd.trainer.probe import ProbeCallback

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32)
    probe = ProbeCallback(statistic=statistic)
    args = TrainingArguments(
        output_dir=workdir, max_steps=steps, per_device_train_batch_size=4, learning_rate=lr,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
        data_seed=0,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    start = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[probe]).train()
    return probe, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-steps", type=int, default=30)
    parser.add_argument("--probe-steps", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument("--statistics", nargs="+", default=["update", "grad", "adam"])
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--workdir", default="/tmp/mask_probe_bench")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from sparse_opd.embedded import embedded_model_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = build_dataset(tokenizer, 4 * args.full_steps, seed=0)
    full, seconds = run(args.full_steps, "update", args.lr, data, tokenizer, args.workdir)
    moved = full.current_scores()
    below = sum(int((s <= 1e-5).sum()) for s in moved.values()) / sum(s.numel() for s in moved.values())
    reference = full.to_mask(density=args.density, block_weights="uniform")
    print(f"full run: {args.full_steps} steps, lr {args.lr}, {seconds:.0f} s; {below:.1%} of entries moved <= 1e-5; "
          f"reference = top {args.density:.0%} by |delta| per module ({reference.count():,} coordinates)\n")
    print("| statistic | probe steps | precision (= recall) | Jaccard | lift over random | probe time s |")
    print("|---|---:|---:|---:|---:|---:|")
    for statistic in args.statistics:
        for steps in args.probe_steps:
            probe, seconds = run(steps, statistic, args.lr, data, tokenizer, args.workdir)
            mask = probe.to_mask(total=reference.count(), block_weights="uniform")
            total = reference.overlap(mask)["total"]
            print(f"| {statistic} | {steps} | {total.coverage_a:.3f} | {total.jaccard:.3f} | "
                  f"{total.coverage_a / args.density:.1f}x | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
