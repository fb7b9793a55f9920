"""Which coordinates should the default run train? The default recipe (`--config cpu`) with each mask strategy at
the same density, the same steps and the same data, scored on the same held-out problems with paired standard
errors; the probe's discovery time is measured inside the run.

    python benchmarks/mask_choice.py                               # probe, near_zero, random; 200 problems
    python benchmarks/mask_choice.py --strategies probe random -- --max_steps 12

Flags after `--` go to the job (`sparse-opd train --help`). Results: <out>/<strategy>.json and a Markdown table on
stdout (recorded in docs/example_output.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from sparse_opd import job
from sparse_opd.job.models import load_student, share_cpu_threads
from sparse_opd.job.training import make_trainer

STRATEGIES = ("probe", "near_zero", "random")


def run_strategy(strategy: str, args, test, out: Path) -> dict:
    training = dataclasses.replace(args.training, mask_strategy=strategy, output_dir=str(out / strategy),
                                   save_strategy="no")
    args = args._replace(training=training)
    student, tokenizer = load_student(args)
    train, _ = job.load_data(args.job)
    started = time.perf_counter()
    trainer = make_trainer(student, None, tokenizer, train, test, args)  # the mask is built here
    discovery = time.perf_counter() - started
    started = time.perf_counter()
    trainer.train()
    training = time.perf_counter() - started
    after = job.evaluate(trainer.model, tokenizer, test, args, desc=f"evaluation ({strategy})", trainer=trainer)
    counts = trainer.model.peft_config[trainer.adapter_name].module_counts
    return {"strategy": strategy, "discovery_s": discovery, "train_s": training, "accuracy": after.accuracy,
            "coordinates": sum(counts.values()), "correct": [int(c) for c in after.correct]}


def table(base: dict, results: list[dict]) -> str:
    from sparse_opd.tasks import paired_difference

    reference = results[0]
    lines = [(f"| mask | coordinates | discovery s | training s | accuracy | gain vs base (paired SE) | vs "
             f"{reference['strategy']} (paired SE) |"), "|---|---:|---:|---:|---:|---:|---:|",
             f"| none (base student) | 0 | | | {100 * base['accuracy']:.1f}% | | |"]
    for r in results:
        gain, se = paired_difference(base["correct"], r["correct"])
        versus = "" if r is reference else "{:+.1f} +/- {:.1f}".format(
            *(100 * x for x in paired_difference(reference["correct"], r["correct"])))
        lines.append(f"| {r['strategy']} | {r['coordinates']:,} | {r['discovery_s']:.0f} | {r['train_s']:.0f} | "
                     f"{100 * r['accuracy']:.1f}% | {100 * gain:+.1f} +/- {100 * se:.1f} | {versus} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--num_eval", type=int, default=200, help="held-out problems")
    parser.add_argument("--out", default="outputs/mask_choice")
    parser.add_argument("job_flags", nargs="*", help="flags for the job, after `--`")
    cli = parser.parse_args()
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    preset = [] if "--config" in cli.job_flags else ["--config", "cpu"]
    argv = [*preset, "--num_eval", str(cli.num_eval), "--analyze", "false", *cli.job_flags]
    with job.quiet(argv):
        args = job.parse_args(argv)
        share_cpu_threads(args.training)
        student, tokenizer = load_student(args)
        _, test = job.load_data(args.job)
        base_path = out / "base.json"
        if base_path.exists():
            base = json.loads(base_path.read_text())
        else:
            before = job.evaluate(student, tokenizer, test, args, desc="evaluation (base)")
            base = {"accuracy": before.accuracy, "correct": [int(c) for c in before.correct]}
            base_path.write_text(json.dumps(base))
        del student
        results = []
        for strategy in cli.strategies:
            path = out / f"{strategy}.json"
            if not path.exists():
                path.write_text(json.dumps(run_strategy(strategy, args, test, out)))
            results.append(json.loads(path.read_text()))
            print(f"{strategy}: {100 * results[-1]['accuracy']:.1f}%", flush=True)
    print(table(base, results))


if __name__ == "__main__":
    main()
