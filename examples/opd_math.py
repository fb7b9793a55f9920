"""On-policy distillation of math skill into a sparse delta: the recipe behind `sparse-opd train`.

    accelerate launch examples/opd_math.py                    # embedded SmolLM2-135M, synthetic task, `cpu` preset
    accelerate launch examples/opd_math.py --config smoke     # a one-minute pass through every phase
    accelerate launch examples/opd_math.py --dataset_name my_train.jsonl --eval_dataset_name my_test.jsonl
    accelerate launch examples/opd_math.py --config gpu --model_name_or_path Qwen/Qwen3-1.7B \\
        --teacher_model_name_or_path Qwen/Qwen3-8B --dataset_name openai/gsm8k --dataset_config main \\
        --push_to_hub --hub_model_id you/qwen3-1.7b-sparse-opd

The student samples answers to math problems; the teacher scores every sampled token; the student's sparse delta
moves to match the teacher. The delta's coordinates come from OPD itself: a few dense OPD steps (the probe) rank every
weight entry by how much it moved, and the top 1% (FFN-weighted) are kept. Without a teacher model, the teacher is the
student's own base weights shown the reference solution, which the student never sees (on-policy context
distillation).

Flags: every field of `sparse_opd.job.JobArguments` and of `SparseOPDConfig` (so TRL's `DistillationConfig` and
transformers' `TrainingArguments`); `--config` takes a preset (sparse_opd/presets/*.yaml) or your own YAML file;
`--help` lists them all with their defaults.
"""

import sys
import time

from sparse_opd import job


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    started = time.perf_counter()
    # library warnings and logs below ERROR stay out of the output, and bad input ends in one line, unless --verbose
    with job.quiet(argv) as output, job.errors_in_one_line("opd_math.py", output.verbose):
        args, config = job.parse_args(argv)
        job.prepare_cpu_run(config)

        # 1. The student, the teacher (None: the student's base weights in the privileged context) and the data
        student, tokenizer = job.load_student(args, config)
        teacher = job.load_teacher(config)
        train, test = job.load_data(args)
        job.say(f"student: {student.name_or_path}; teacher: {job.teacher_sees(args, config, teacher, train)}")

        # 2. Before training: is the teacher worth distilling?
        student.to(config.device)
        results = {"student before": job.evaluate(student, tokenizer, test, args, desc="evaluation (student)")}
        results["teacher"] = job.evaluate_teacher(student, teacher, tokenizer, test, args, config)
        job.say(f"student before: {results['student before']}\nteacher:        {results['teacher']}")

        # 3. Discover the coordinates (inside SparseOPDTrainer: --mask_strategy) and distill into the sparse delta
        trainer = job.make_trainer(student, teacher, tokenizer, train, config, args)
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)

        # 4. After training, save (or push) the adapter with a card that states what it is and what it scored
        results["student after"] = job.evaluate(trainer.model, tokenizer, test, args, "prompt", "evaluation (after)",
                                                trainer=trainer)
        job.say(f"student after:  {results['student after']}")
        job.save(trainer, args, results)
        if trainer.is_world_process_zero():
            job.say(job.summary(trainer, args, results, started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
