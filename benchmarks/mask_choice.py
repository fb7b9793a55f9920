"""Which coordinates should the default run train? The default recipe (`--config cpu`) with each mask strategy at
the same density, the same steps, learning rate and data, scored on the same held-out problems with paired standard
errors, at several densities; discovery time is measured inside each run.

    python benchmarks/mask_choice.py                     # gradient, probe, near_zero, random at 0.1%, 1%, 5%
    python benchmarks/mask_choice.py --densities 0.01 --strategies gradient gradient:fisher gradient:mean
    python benchmarks/mask_choice.py --strategies probe random -- --max_steps 12

A strategy is a `--mask_strategy` value; `gradient:STATISTIC` sets `--mask_gradient_statistic`. Flags after `--` go
to the job (`sparse-opd train --help`). Results: <out>/d<density>/<strategy>.json and a Markdown table per density on
stdout (recorded in docs/masks.md).
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

STRATEGIES = ("gradient", "probe", "near_zero", "random")
CHOICES = (*STRATEGIES, "gradient:snr", "gradient:gain", "gradient:fisher", "gradient:mean")
DENSITIES = (0.001, 0.01, 0.05)


def run_strategy(strategy: str, density: float, args, test, out: Path) -> dict:
    name, _, statistic = strategy.partition(":")
    fields = {"mask_strategy": name, "mask_density": density, "output_dir": str(out / strategy.replace(":", "-")),
              "save_strategy": "no"}
    if statistic:
        fields["mask_gradient_statistic"] = statistic
    args = args._replace(training=dataclasses.replace(args.training, **fields))
    student, tokenizer = load_student(args)
    train, _ = job.load_data(args.job)
    started = time.perf_counter()
    trainer = make_trainer(student, None, tokenizer, train, test, args)  # the mask is built here
    discovery = time.perf_counter() - started
    started = time.perf_counter()
    trainer.train()
    training = time.perf_counter() - started
    report = trainer.discovery.report if getattr(trainer, "discovery", None) is not None else None
    if report:  # gradient discovery runs at the start of train()
        discovery, training = discovery + report["seconds"], training - report["seconds"]
    after = job.evaluate(trainer.model, tokenizer, test, args, desc=f"evaluation ({strategy})", trainer=trainer)
    counts = trainer.model.peft_config[trainer.adapter_name].module_counts
    return {"strategy": strategy, "density": density, "discovery_s": discovery, "train_s": training,
            "accuracy": after.accuracy, "coordinates": sum(counts.values()),
            "correct": [float(c) for c in after.correct], "discovery": report}


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
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=CHOICES)
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
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
            base = {"accuracy": before.accuracy, "correct": [float(c) for c in before.correct]}
            base_path.write_text(json.dumps(base))
        del student
        tables = []
        for density in cli.densities:
            results = []
            for strategy in cli.strategies:
                path = out / f"d{density:g}" / f"{strategy.replace(':', '-')}.json"
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(run_strategy(strategy, density, args, test, path.parent)))
                results.append(json.loads(path.read_text()))
                print(f"{100 * density:g}% {strategy}: {100 * results[-1]['accuracy']:.1f}%", flush=True)
            tables.append(f"### density {100 * density:g}%\n\n" + table(base, results))
    print("\n\n".join(tables))

if __name__ == "__main__":
    main()
