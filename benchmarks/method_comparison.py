"""Which method, which density, which rate: sparse OPD (the presets' discovery, the AdamW probe) against LoRA OPD
at the same trainable count and full OPD, each at its best of three learning rates, on the default run's model,
task and steps.

    python benchmarks/method_comparison.py                              # 9 runs, 200 held-out problems
    python benchmarks/method_comparison.py --mask_choice outputs/mask_choice   # + sparse at 0.1% / 1% / 5% from there

Each run is a fresh process of the `cpu` preset (embedded SmolLM2-135M-Instruct, synthetic level-1 task, teacher =
the base weights shown the reference solution, 24 steps of 8 rollouts, 48 new tokens) that differs only in the
method and learning rate; all are scored on the same 200 held-out problems (greedy, the data-derived answer length),
differences paired over them. Reported: accuracy, paired gain over the base student and over the best sparse run,
training wall time, peak resident memory of the process, and the bytes of what is saved (adapter or checkpoint).
Results: <out>/<method>-<lr>.json, a Markdown table on stdout (recorded in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RATES = {"sparse": (5e-4, 2e-3, 8e-3), "lora": (2e-4, 1e-3, 5e-3), "full": (5e-6, 2e-5, 8e-5)}


def _args(num_eval: int, extra: list[str]):
    from sparse_opd import job

    return job.parse_args(["--config", "cpu", "--num_eval", str(num_eval), "--analyze", "false", *extra])


def child(method: str, lr: float, num_eval: int, extra: list[str]) -> dict:
    import dataclasses

    from peft import LoraConfig

    from sparse_opd import job
    from sparse_opd.job.models import load_student, share_cpu_threads
    from sparse_opd.job.training import make_trainer
    from sparse_opd.masks.targets import linear_modules, stored_shape
    from sparse_opd.trainer import OPDTrainer

    args = _args(num_eval, extra)
    share_cpu_threads(args.training)
    with tempfile.TemporaryDirectory() as out:
        fields = {"learning_rate": lr, "output_dir": out, "save_strategy": "no"}
        if method != "sparse":
            fields["mask_strategy"] = None
        args = args._replace(training=dataclasses.replace(args.training, **fields))
        student, tokenizer = load_student(args)
        train, test = job.load_data(args.job)
        shapes = {n: stored_shape(m) for n, m in linear_modules(student).items()}
        adapted = sum(r * c for r, c in shapes.values())
        if method == "sparse":
            trainer = make_trainer(student, None, tokenizer, train, test, args)
        else:
            peft_config = None
            if method == "lora":
                rank = max(1, round(args.training.mask_density * adapted / sum(r + c for r, c in shapes.values())))
                peft_config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
            trainer = OPDTrainer(model=student, args=args.training, train_dataset=train, processing_class=tokenizer,
                                 peft_config=peft_config)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        trainer.save_model(os.path.join(out, "saved"))
        saved = sum(f.stat().st_size for f in Path(out, "saved").glob("*.safetensors"))
        after = job.evaluate(trainer.model, tokenizer, test, args, desc=None, trainer=trainer)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"method": method, "learning_rate": lr, "accuracy": after.accuracy, "train_s": seconds,
            "peak_mib": peak, "saved_bytes": saved, "trainable": trainable,
            "correct": [float(c) for c in after.correct]}


def table(base: dict, runs: list[dict], densities: list[dict]) -> str:
    from sparse_opd.tasks import paired_difference

    def pm(a, b):
        gain, se = paired_difference(a["correct"], b["correct"])
        return f"{100 * gain:+.1f} +/- {100 * se:.1f}"

    best = {m: max((r for r in runs if r["method"] == m), key=lambda r: r["accuracy"]) for m in RATES
            if any(r["method"] == m for r in runs)}
    # without sparse runs of its own, the sparse run at the default 1% from mask_choice is the reference
    reference = best.get("sparse") or next((d for d in densities if d["density"] == 0.01), None)
    lines = [("| method | learning rate | trainable | accuracy | gain vs base | vs sparse | training s | "
              "peak RSS (MiB) | saved (MiB) |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| base student | | 0 | {100 * base['accuracy']:.1f}% | | | | | |"]
    for r in runs:
        mark = "**" if best.get(r["method"]) is r else ""
        versus = pm(reference, r) if reference is not None and r is not reference else ""
        lines.append(f"| {mark}{r['method']}{mark} | {r['learning_rate']:g} | {r['trainable'] / 1e6:,.2f}M | "
                     f"{100 * r['accuracy']:.1f}% | {pm(base, r)} | {versus} | {r['train_s']:.0f} | "
                     f"{r['peak_mib']:.0f} | {r['saved_bytes'] / 2**20:.2f} |")
    for d in densities:
        lines.append(f"| sparse at {100 * d['density']:g}% (mask_choice) | 2e-3 | {d['coordinates'] / 1e6:,.2f}M | "
                     f"{100 * d['accuracy']:.1f}% | {pm(base, d)} | | {d['train_s']:.0f} | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(RATES), choices=list(RATES))
    parser.add_argument("--learning_rates", type=float, nargs="+", default=None,
                        help="rates to run for each of --methods instead of their grid of three")
    parser.add_argument("--num_eval", type=int, default=200)
    parser.add_argument("--out", default="outputs/method_comparison")
    parser.add_argument("--mask_choice", default=None, help="a benchmarks/mask_choice.py output folder: its base "
                        "evaluation and its probe runs at each density")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("job_flags", nargs="*", help="flags for the job, after `--`")
    cli = parser.parse_args()
    if cli.child:
        result = child(cli.child[0], float(cli.child[1]), cli.num_eval, cli.job_flags)
        print("RESULT " + json.dumps(result), flush=True)
        return
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)
    base_path = Path(cli.mask_choice, "base.json") if cli.mask_choice else out / "base.json"
    if not base_path.exists():
        from sparse_opd import job
        from sparse_opd.job.models import load_student

        args = _args(cli.num_eval, cli.job_flags)
        student, tokenizer = load_student(args)
        _, test = job.load_data(args.job)
        before = job.evaluate(student, tokenizer, test, args, desc="evaluation (base)")
        base_path.write_text(json.dumps({"accuracy": before.accuracy, "correct": [float(c) for c in before.correct]}))
    base = json.loads(base_path.read_text())
    runs = []
    for method in cli.methods:
        # the runs kept in <out> (e.g. an extra rate where the best one sat at the edge of the grid) are reported too
        kept = {float(p.stem.split("-", 1)[1]) for p in out.glob(f"{method}-*.json")}
        for lr in sorted(set(cli.learning_rates or RATES[method]) | kept):
            path = out / f"{method}-{lr:g}.json"
            if not path.exists():
                command = [sys.executable, __file__, "--child", method, str(lr), "--num_eval", str(cli.num_eval),
                           "--", *cli.job_flags]
                done = subprocess.run(command, check=False, capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode or not lines:
                    raise SystemExit(f"{method} at {lr:g} failed:\n{done.stderr[-3000:]}")
                path.write_text(lines[-1][len("RESULT "):])
            runs.append(json.loads(path.read_text()))
            print(f"{method} {lr:g}: {100 * runs[-1]['accuracy']:.1f}%", flush=True)
    densities = []
    if cli.mask_choice:
        for folder in sorted(Path(cli.mask_choice).glob("d*")):
            path = folder / "probe.json"
            if path.exists():
                densities.append(json.loads(path.read_text()))
    print(table(base, runs, sorted(densities, key=lambda d: d["density"])))


if __name__ == "__main__":
    main()
