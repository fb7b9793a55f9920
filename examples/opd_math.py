"""On-policy distillation of math skill into a sparse delta: the recipe behind `sparse-opd train`.

    accelerate launch examples/opd_math.py                    # embedded SmolLM2-135M, synthetic task, device's preset
    accelerate launch examples/opd_math.py --config smoke     # a one-minute pass through every phase
    accelerate launch examples/opd_math.py --dataset_name my_train.jsonl --eval_dataset_name my_test.jsonl
    accelerate launch examples/opd_math.py --dataset_name prompts.jsonl --teacher_model_name_or_path my-teacher
    accelerate launch examples/opd_math.py --config gpu --model_name_or_path Qwen/Qwen3-1.7B \\
        --teacher_model_name_or_path Qwen/Qwen3-8B --dataset_name openai/gsm8k --dataset_config main \\
        --push_to_hub --hub_model_id you/qwen3-1.7b-sparse-opd

The student samples answers to math problems; the teacher scores every sampled token; the student's sparse delta
moves to match the teacher. The delta's coordinates come from OPD itself: a few dense OPD steps (the probe) rank every
weight entry by how much it moved, and the top 1% (FFN-weighted) are kept. Without a teacher model, the teacher is the
student's own base weights shown the reference solution, which the student never sees (on-policy context
distillation).

Your data may be question/answer rows (a GSM8K file as it is) or prompts in TRL's formats (`prompt`, `messages`), with
or without reference answers. Numeric answers are scored as benchmarks score them, text answers by `--metric`; without
answers the job measures what OPD minimizes, the teacher-student divergence on held-out prompts, before and after.

Flags: every field of TRL's `ScriptArguments` and `ModelConfig`, of `sparse_opd.job.JobArguments` and of
`SparseOPDConfig` (so TRL's `DistillationConfig` and transformers' `TrainingArguments`); `--config` takes a preset
(sparse_opd/presets/*.yaml: `gpu` where there is a GPU, else `cpu`) or your own YAML file; `--help` lists them all with
their defaults. Each step below is one call into `sparse_opd.job`, which holds the run's state.
"""

import sys

from sparse_opd.job import OPDJob, console


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # library warnings and logs below ERROR stay out of the output, and bad input ends in one line, unless --verbose
    with console(argv, prog="opd_math.py"):
        job = OPDJob.from_command_line(argv)  # flags over a preset; refused flags and bad paths end here
        job.load_data()  # training and held-out rows, the teacher's privileged prompts, and how to evaluate them
        job.load_models()  # the device, the student, and the teacher (None: the student's own base weights)
        job.evaluate_before()  # is the teacher worth distilling? scores (or divergence) and warnings if not
        job.train()  # discover the coordinates (--mask_strategy) and distill into the sparse delta
        job.evaluate_after()  # the same held-out rows, and the paired change
        job.save()  # the adapter, with a card that says how to load it, what it scored, and if it got worse
        job.report()  # the summary: gain, trained coordinates, the analyzer's view of the delta
    return 0


if __name__ == "__main__":
    sys.exit(main())
