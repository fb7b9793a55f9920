"""Reproduce "Dense Supervision, Sparse Updates" on the embedded SmolLM2-135M-Instruct, stage by stage.

    python benchmarks/reproduce_paper.py all                 # every run in order, skipping finished ones
    python benchmarks/reproduce_paper.py full_seed0          # one run of the RUNS table (see `--help`)
    python benchmarks/reproduce_paper.py report              # print the tables from the finished runs

The student is trained by on-policy context distillation on the level-1 synthetic arithmetic task (the teacher is its
own base weights shown the reference solution, as in `examples/opd_math.py`). Every run of the `RUNS` table runs in
its own process, so that its peak RSS is its own, and writes `OUT/<name>/result.json` (finished runs are skipped on a
rerun). Its stage says what it does:

- `base`: held-out accuracy of the student and of the teacher;
- `full`: full-parameter OPD (AdamW), the merged checkpoint saved for the analyzer and the diff mask;
- `analyze`: the analyzer on full OPD's delta (all precision modes, nulls): `OUT/analysis/report.json`, `report.md`
  and the plots;
- `masks`: the diff mask (coordinates whose bf16 value changed), per-module matched random and near-zero masks;
- `overlap`: the overlap of the two seeds' changed coordinates against random expectations;
- `sparse`: retrain from the base on a mask (diff, random, near_zero, probe) with AdamW, SGD or momentum SGD;
- `lora`: LoRA on every linear layer with about the diff mask's trainable count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

STEPS = 24
BATCH = 8
COMPLETION = 48
FULL_LR = 2e-5  # AdamW, full OPD
SPARSE_LR = 2e-4  # AdamW on a mask: 10x, like LoRA's (at FULL_LR the diff mask recovered nothing, see docs)
LORA_LR = 2e-4  # LoRA's usual ~10x the full fine-tuning rate
# SGD's step is lr x |grad| (|grad| ~0.5 here), AdamW's ~lr x sqrt(trainable) (~0.8 at 2e-4 on the diff mask): SGD
# at 0.1 moves ~15x less per step, so SGD is also run at 1.0, and momentum 0.9 at 0.1 (an effective rate of 1.0)
SGD_LR = {"sgd": 0.1, "sgd_momentum": 0.1}
NUM_TRAIN = 2000
NUM_EVAL = 200
EVAL_TOKENS = 80
SEEDS = (0, 1)
if os.environ.get("REPRO_SMOKE"):  # a minutes-long pass through every stage that checks the plumbing
    STEPS, BATCH, COMPLETION, NUM_EVAL, EVAL_TOKENS = 1, 2, 8, 4, 8


# --------------------------------------------------------------------------------------------------------- helpers
def run_dir(out, name):
    path = os.path.join(out, name)
    os.makedirs(path, exist_ok=True)
    return path


def done(out, name):
    return os.path.exists(os.path.join(out, name, "result.json"))


def save_result(out, name, result):
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(os.path.join(run_dir(out, name), "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "correct"}, indent=1))


def load_result(out, name):
    with open(os.path.join(out, name, "result.json")) as f:
        return json.load(f)


def base_path():
    from sparse_opd.embedded import resolve_model_path

    return resolve_model_path("embedded")


def load_student():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = base_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(
        path, padding_side="left"
    )


def datasets():
    from sparse_opd.tasks import arithmetic_dataset

    return arithmetic_dataset("train", NUM_TRAIN, 1), arithmetic_dataset("test", NUM_EVAL, 1)


def opd_args(out_dir, seed, learning_rate, **overrides):
    from sparse_opd.trainer import SparseOPDConfig

    fields = dict(
        output_dir=out_dir,
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        max_completion_length=COMPLETION,
        learning_rate=learning_rate,
        beta=1.0,
        temperature=1.0,
        seed=seed,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=min(4, STEPS),
        dataloader_num_workers=0,
    )
    fields.update(overrides)
    return SparseOPDConfig(**fields)


def score(model, tokenizer, test, prompt_column="prompt"):
    from sparse_opd.tasks import evaluate_model
    from sparse_opd.tuner import merged_sparse_delta  # a sparse delta generates merged where exact (a no-op otherwise)

    result = evaluate_model(model, tokenizer, test, prompt_column=prompt_column, max_new_tokens=EVAL_TOKENS,
                            generation_context=merged_sparse_delta)
    correct = [int(c) for c in result.correct]
    return {
        "accuracy": result.accuracy,
        "stderr": result.stderr,
        "format_error_rate": result.format_error_rate,
        "eval_seconds": result.seconds,
        "correct": correct,
    }


def train_and_score(trainer, tokenizer, test):
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    result = score(trainer.model, tokenizer, test)
    result.update(train_seconds=seconds, final_loss=logs[-1]["loss"], log_history=logs)
    return result


# ---------------------------------------------------------------------------------------------------------- stages
def stage_base(out, run):
    student, tokenizer = load_student()
    _, test = datasets()
    result = {"student": score(student, tokenizer, test), "teacher": score(student, tokenizer, test, "teacher_prompt")}
    save_result(out, run.name, result)


def stage_full(out, run):
    from sparse_opd.trainer import OPDTrainer

    name, learning_rate = run.name, run.lr or FULL_LR
    student, tokenizer = load_student()
    train, test = datasets()
    trainer = OPDTrainer(
        model=student,
        args=opd_args(run_dir(out, name), run.seed, learning_rate),
        train_dataset=train,
        processing_class=tokenizer,
    )
    result = train_and_score(trainer, tokenizer, test)
    trainer.model.save_pretrained(os.path.join(out, name, "model"))  # fp32, for the analyzer and the diff mask
    tokenizer.save_pretrained(os.path.join(out, name, "model"))
    result.update(trainable=sum(p.numel() for p in student.parameters() if p.requires_grad),
                  learning_rate=learning_rate)
    save_result(out, name, result)


def stage_analyze(out, run):
    from sparse_opd.analysis import analyze_delta

    start = time.perf_counter()
    report = analyze_delta(base_path(), os.path.join(out, "full_seed0", "model"), progress=False)
    report.save(run_dir(out, run.name))
    print(report.summary())
    save_result(out, run.name, {"seconds": time.perf_counter() - start, "summary": report.summary()})


def diff_mask(out, seed):
    from sparse_opd.masks import SparseMask

    # What a bf16 checkpoint of full OPD would show: the coordinates whose bf16 value changed.
    return SparseMask.from_diff(
        base_path(), os.path.join(out, f"full_seed{seed}", "model"), mode="changed", precision="bf16"
    )


def matched_masks(diff, student, seed=0):
    """Random and smallest-|W| masks with the diff mask's count in every module."""
    from sparse_opd.masks import SparseMask, prior_indices

    counts, numels = diff.counts(), {name: diff.numel(name) for name in diff.modules()}
    weights = {name: student.get_submodule(name).weight for name in diff.modules()}
    return tuple(
        SparseMask(prior_indices(how, counts, numels, weights, seed), diff.shapes) for how in ("random", "near_zero")
    )


def stage_masks(out, run):
    from sparse_opd.masks import mask_overlap

    student, _ = load_student()
    masks_dir = run_dir(out, "masks")
    diff = diff_mask(out, 0)
    random, near_zero = matched_masks(diff, student)
    for name, mask in (("diff", diff), ("random", random), ("near_zero", near_zero)):
        mask.save(os.path.join(masks_dir, f"{name}.safetensors"))
    targeted = sum(diff.numel(n) for n in diff.modules())
    result = {
        "budget": diff.count(),
        "targeted": targeted,
        "density": diff.count() / targeted,
        "diff_vs_near_zero": mask_overlap(diff, near_zero)["total"].to_dict(),
        "diff_vs_random": mask_overlap(diff, random)["total"].to_dict(),
    }
    save_result(out, run.name, result)


def stage_overlap(out, run):
    """Overlap of the two seeds' changed coordinates, as bf16 checkpoints would show them and as stored."""
    from sparse_opd.analysis import delta_overlap

    seeds = [os.path.join(out, f"full_seed{s}", "model") for s in SEEDS]
    result = {}
    for precision, threshold in (("bf16", 0.0), ("raw", 1e-5), ("raw", 1e-4)):
        overlap = delta_overlap(base_path(), *seeds, threshold=threshold, precision=precision)
        result[f"{precision}_{threshold:g}"] = {
            "total": overlap["total"].to_dict(),
            "by_block": {k: v.to_dict() for k, v in overlap["by_block"].items()},
        }
    save_result(out, run.name, result)


def stage_sparse(out, run):
    from peft import get_peft_model

    from sparse_opd import SparseDeltaConfig
    from sparse_opd.masks import SparseMask
    from sparse_opd.trainer import SparseOPDTrainer

    name = run.name
    student, tokenizer = load_student()
    train, test = datasets()
    budget = load_result(out, "masks")
    lr = run.lr or (SPARSE_LR if run.optim == "adamw" else SGD_LR[run.optim])
    optim = {"adamw": {}, "sgd": {"optim": "sgd"}, "sgd_momentum": {"optim": "sgd", "optim_args": "momentum=0.9"}}
    config = opd_args(run_dir(out, name), 0, lr, **optim[run.optim])
    if run.mask == "probe":
        config.mask_strategy, config.mask_density = "probe", budget["density"]
        config.mask_probe_learning_rate = FULL_LR  # the probe's dense steps run at the full-OPD rate
        model = student
    else:
        mask = SparseMask.load(os.path.join(out, "masks", f"{run.mask}.safetensors"))
        model = get_peft_model(student, SparseDeltaConfig(mask=mask))
    start = time.perf_counter()
    trainer = SparseOPDTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    setup_seconds = time.perf_counter() - start
    result = train_and_score(trainer, tokenizer, test)
    trainer.save_model(os.path.join(out, name, "adapter"))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result.update(trainable=trainable, learning_rate=lr, setup_seconds=setup_seconds)
    save_result(out, name, result)


def stage_lora(out, run):
    from peft import LoraConfig

    from sparse_opd.trainer import OPDTrainer

    student, tokenizer = load_student()
    train, test = datasets()
    budget = load_result(out, "masks")["budget"]
    per_rank = sum(
        m.in_features + m.out_features
        for n, m in student.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    )
    rank = max(1, round(budget / per_rank))
    trainer = OPDTrainer(
        model=student,
        args=opd_args(run_dir(out, run.name), 0, LORA_LR),
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0),
    )
    result = train_and_score(trainer, tokenizer, test)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result.update(trainable=trainable, rank=rank, learning_rate=LORA_LR)
    save_result(out, run.name, result)


# ------------------------------------------------------------------------------------------------------------ runs
@dataclass(frozen=True)
class Run:
    """One row of the plan: the result directory `name`, the stage that makes it and that stage's settings."""

    name: str
    stage: str
    seed: int = 0
    mask: str | None = None
    optim: str = "adamw"
    lr: float | None = None  # default: FULL_LR (full), SPARSE_LR or SGD_LR (sparse)
    reference: bool = False  # the report pairs every training run with this one

    @property
    def trains(self) -> bool:
        return self.stage in ("full", "sparse", "lora")


RUNS = [  # the plan, most important first: a run cut short still answers the main questions
    Run("base", "base"),
    Run("full_seed0", "full", reference=True),
    Run("analysis", "analyze"),
    Run("masks", "masks"),
    Run("sparse_diff_adamw_lr2e-05", "sparse", mask="diff", lr=2e-5),  # at the full-OPD rate
    Run("sparse_diff_adamw", "sparse", mask="diff", reference=True),
    Run("sparse_random_adamw", "sparse", mask="random"),
    Run("sparse_near_zero_adamw", "sparse", mask="near_zero"),
    Run("full_seed0_lr0.0002", "full", lr=2e-4, reference=True),  # is the masks' 10x rate what helps, mask or not?
    Run("lora", "lora"),
    Run("sparse_diff_sgd", "sparse", mask="diff", optim="sgd", reference=True),
    Run("full_seed1", "full", seed=1),
    Run("overlap", "overlap"),
    Run("sparse_probe_adamw", "sparse", mask="probe", reference=True),
    Run("sparse_diff_sgd_momentum", "sparse", mask="diff", optim="sgd_momentum"),
    Run("sparse_diff_sgd_lr1", "sparse", mask="diff", optim="sgd", lr=1.0),
]
RUNS_BY_NAME = {run.name: run for run in RUNS}


def stage_all(out):
    for run in RUNS:
        if done(out, run.name):
            print(f"== {run.name}: done", flush=True)
            continue
        print(f"== {run.name}: running", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, run.name, "--out", out], check=True)
        print(f"== {run.name}: {time.perf_counter() - start:.0f}s", flush=True)
    stage_report(out)


# ---------------------------------------------------------------------------------------------------------- report
def paired(a, b):
    """Difference of accuracies b - a on the same problems, with its paired standard error."""
    from sparse_opd.tasks import paired_difference

    return paired_difference(a, b)


def stage_report(out):
    if not done(out, "base"):
        raise SystemExit(f"report: no results under {out}/ (it reads the <run>/result.json files that `python "
                         f"benchmarks/reproduce_paper.py all --out {out}` writes, about 3 hours on 2 CPU cores; the "
                         "documented run's are not in the repository) and prints the numbers of docs/reproduction.md "
                         "sections 2-4")
    base = load_result(out, "base")
    before = base["student"]["correct"]
    trained = [run for run in RUNS if run.trains and done(out, run.name)]
    rows = [("student (base)", base["student"]), ("teacher (base + solution)", base["teacher"])]
    rows += [(run.name, load_result(out, run.name)) for run in trained]
    full_gain = None
    if done(out, "full_seed0"):
        full_gain = paired(before, load_result(out, "full_seed0")["correct"])[0]
    print("| run | trainable | accuracy | gain vs base (paired SE) | share of full OPD gain | train s "
          "| peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        gain, se = paired(before, r["correct"])
        share = f"{100 * gain / full_gain:.0f}%" if full_gain and "trainable" in r else ""
        print(
            f"| {name} | {r.get('trainable', ''):,} | {100 * r['accuracy']:.1f}% +/- {100 * r['stderr']:.1f} | "
            f"{100 * gain:+.1f} +/- {100 * se:.1f} | {share} | {r.get('train_seconds', 0):.0f} | "
            f"{r.get('peak_rss_mib', 0):.0f} |"
            if "trainable" in r
            else f"| {name} |  | {100 * r['accuracy']:.1f}% +/- {100 * r['stderr']:.1f} | "
            f"{100 * gain:+.1f} +/- {100 * se:.1f} |  |  |  |"
        )
    for reference in (run for run in trained if run.reference):
        correct = load_result(out, reference.name)["correct"]
        for run in trained:
            if run is not reference:
                gain, se = paired(correct, load_result(out, run.name)["correct"])
                print(f"{run.name} - {reference.name}: {100 * gain:+.1f} +/- {100 * se:.1f} points (paired)")
    for run in trained:
        adapter = os.path.join(out, run.name, "adapter", "adapter_model.safetensors")
        if run.stage == "sparse" and os.path.exists(adapter):
            norm, largest = sparse_update_size(adapter)
            print(f"{run.name}: norm of the trained values {norm:.3f}, largest |value| {largest:.2e}")
    if done(out, "sparse_probe_adamw") and done(out, "masks"):
        print(json.dumps({"probe_mask_vs": probe_mask_overlap(out)}, indent=1))
    for name in ("masks", "overlap"):
        if done(out, name):
            print(json.dumps(load_result(out, name), indent=1))


def sparse_update_size(adapter_file):
    """Frobenius norm and largest entry of a sparse-delta adapter's trained values (the size of its update)."""
    from safetensors import safe_open

    squares, largest = 0.0, 0.0
    with safe_open(adapter_file, "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open)
            if key.endswith("sparse_delta_values"):
                values = f.get_tensor(key).float()
                squares += float(values.square().sum())
                largest = max(largest, float(values.abs().max()))
    return squares**0.5, largest


def probe_mask_overlap(out):
    """Overlap of the mask the probe run found (read back from its adapter) with the diff, near-zero and random
    ones."""
    from peft import PeftModel

    from sparse_opd import adapter_mask
    from sparse_opd.masks import SparseMask

    student, _ = load_student()
    adapter = os.path.join(out, "sparse_probe_adamw", "adapter")
    probe = adapter_mask(PeftModel.from_pretrained(student, adapter))
    result = {"density_by_block": probe.density_by("block")}
    for other in ("diff", "near_zero", "random"):
        other_mask = SparseMask.load(os.path.join(out, "masks", f"{other}.safetensors"))
        result[other] = probe.overlap(other_mask)["total"].to_dict()
    return result


STAGES = {
    "base": stage_base,
    "full": stage_full,
    "analyze": stage_analyze,
    "masks": stage_masks,
    "overlap": stage_overlap,
    "sparse": stage_sparse,
    "lora": stage_lora,
}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", choices=["all", "report", *RUNS_BY_NAME],
                        help="a run of the RUNS table, 'all' (every unfinished run, then the report) or 'report'")
    parser.add_argument("--out", default="outputs/reproduction", help="directory of the runs' results")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if args.run == "all":
        stage_all(args.out)
    elif args.run == "report":
        stage_report(args.out)
    else:
        run = RUNS_BY_NAME[args.run]
        STAGES[run.stage](args.out, run)


if __name__ == "__main__":
    main()
