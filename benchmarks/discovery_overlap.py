"""Where do the AdamW probe's coordinates and the gradient statistics' coordinates differ? On the default run's model,
task and first rollout batches (`--config cpu`), score every adapted coordinate both ways and compare the top
`--density` of each module: the overlap of each gradient statistic's set with the probe's (chance = the density),
and how each set spreads over a weight's rows and columns against a random and a near-zero set.

    python benchmarks/discovery_overlap.py                       # 4 batches, 1%, as in docs/masks.md
    python benchmarks/discovery_overlap.py --batches 8 --layers 3 20

Gradient statistics: `GradientDiscovery.collect` over `--batches` rollout batches at the starting weights. Probe:
`ProbeCallback("update")` over that many dense AdamW OPD steps at the preset's probe learning rate, on a fresh copy
of the student. Printed: a Markdown table of overlaps, then rows/columns concentration (the share of a set's
coordinates in the 10% of rows / columns that hold most of them) and mean |W| of the set / mean |W|, for the
modules of `--layers`.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch

STATISTICS = ("snr", "gain", "fisher", "mean")


def gradient_scores(args, batches: int) -> dict[str, dict[str, torch.Tensor]]:
    from sparse_opd import job
    from sparse_opd.job.models import load_student
    from sparse_opd.job.training import make_trainer

    student, tokenizer = load_student(args)
    train, test = job.load_data(args.job)
    trainer = make_trainer(student, None, tokenizer, train, test, args)
    stats, _, _ = trainer.discovery.collect(trainer.get_train_dataloader(), None, statistics=("snr", "fisher"))
    out = {}
    for statistic in STATISTICS:
        slices = stats.scores(statistic, eps=trainer.args.adam_epsilon, keep=True)
        out[statistic] = {name: torch.cat([s for _, s in pieces]) for name, pieces in slices.items()}
    return out


def probe_scores(args, batches: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from sparse_opd import job
    from sparse_opd.job.models import load_student
    from sparse_opd.masks.sparse_mask import normalize_module_name
    from sparse_opd.trainer import OPDTrainer
    from sparse_opd.trainer.probe import ProbeCallback

    student, tokenizer = load_student(args)
    train, _ = job.load_data(args.job)
    probe = ProbeCallback(statistic="update")
    with tempfile.TemporaryDirectory() as out:
        config = copy.deepcopy(args.training)  # as the probe strategy does: the run's settings, a few dense steps
        for key, value in {"output_dir": out, "max_steps": batches, "save_strategy": "no", "mask_strategy": None,
                           "learning_rate": config.mask_probe_learning_rate, "log_weight_stats": False,
                           "log_rollout_mismatch": False, "model_init_kwargs": None,
                           "teacher_model_init_kwargs": None}.items():
            setattr(config, key, value)
        OPDTrainer(model=student, args=config, train_dataset=train, processing_class=tokenizer,
                   callbacks=[probe]).train()
    weights = {normalize_module_name(n): m.weight.detach() for n, m in student.named_modules()
               if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2}
    scores = {normalize_module_name(n): s.reshape(-1).float() for n, s in probe.current_scores().items()}
    return scores, weights


def concentration(indices: torch.Tensor, shape: tuple[int, int]) -> tuple[float, float]:
    rows = torch.bincount(indices // shape[1], minlength=shape[0]).float()
    cols = torch.bincount(indices % shape[1], minlength=shape[1]).float()
    top_rows = rows.sort(descending=True).values[: max(1, shape[0] // 10)].sum()
    top_cols = cols.sort(descending=True).values[: max(1, shape[1] // 10)].sum()
    return float(top_rows / indices.numel()), float(top_cols / indices.numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 20])
    cli = parser.parse_args()

    from sparse_opd import job
    from sparse_opd.job.models import share_cpu_threads
    from sparse_opd.masks.sparse_mask import normalize_module_name

    args = job.parse_args(["--config", "cpu", "--analyze", "false", "--mask_strategy", "gradient",
                           "--mask_gradient_steps", str(cli.batches), "--disable_tqdm", "true"])
    share_cpu_threads(args.training)
    torch.manual_seed(0)
    gradient = {s: {normalize_module_name(n): v for n, v in d.items()} for s, d in
                gradient_scores(args, cli.batches).items()}
    probe, weights = probe_scores(args, cli.batches)
    names = [n for n in probe if n in gradient["snr"]]

    def top(scores: torch.Tensor) -> torch.Tensor:
        return torch.topk(scores, max(1, int(scores.numel() * cli.density))).indices

    print(f"| statistic ({cli.batches} batches) | top {100 * cli.density:g}% shared with the probe's | chance |")
    print("|---|---:|---:|")
    for statistic in STATISTICS:
        shared = total = 0
        for name in names:
            probe_top, stat_top = top(probe[name]), top(gradient[statistic][name])
            shared += int(torch.isin(stat_top, probe_top).sum())
            total += probe_top.numel()
        print(f"| {statistic} | {100 * shared / total:.2f}% | {100 * cli.density:g}% |")

    print("\n| module | set | top-10% rows hold | top-10% columns hold | mean \\|W\\| / module mean |")
    print("|---|---|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    for name in [n for n in names if any(f"layers.{i}." in n for i in cli.layers)]:
        w = weights[name]
        k = max(1, int(w.numel() * cli.density))
        sets = {"probe": top(probe[name]), "snr": top(gradient["snr"][name]), "fisher": top(gradient["fisher"][name]),
                "random": torch.randperm(w.numel(), generator=generator)[:k],
                "near_zero": top(-w.abs().reshape(-1).float())}
        for label, indices in sets.items():
            rows, cols = concentration(indices, tuple(w.shape))
            ratio = float(w.reshape(-1)[indices].abs().mean() / w.abs().mean())
            print(f"| {name} | {label} | {100 * rows:.0f}% | {100 * cols:.0f}% | {ratio:.2f} |")


if __name__ == "__main__":
    main()
