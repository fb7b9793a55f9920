"""Which statistic finds the coordinates full OPD moves? Masks from the first rollout batches against the update of a
longer full OPD run, on the embedded SmolLM2-135M-Instruct (the default run's task, teacher and settings).

    python benchmarks/discovery_fidelity.py                       # 24 full OPD steps, 8 discovery batches
    python benchmarks/discovery_fidelity.py --full_steps 48 --json outputs/fidelity.json

Reference: ``|W_24 - W_0|`` of full OPD (AdamW on every weight, the reproduction's 2e-5), kept at the budget's count
per module (FFN-weighted). Candidates, each at the same counts: the gradient statistics of `mask_strategy="gradient"`
(``snr``, ``fisher``, ``mean``; one pass over the same 8 rollout batches), the AdamW probe (4 dense steps, the `cpu`
preset's), the near-zero prior and random coordinates. Recall = |candidate & reference| / |reference|; random's
expectation is the density. Prints a Markdown table per density (recorded in docs/masks.md).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import torch

DENSITIES = (0.001, 0.01, 0.05)


def _args(out: str, **overrides):
    from sparse_opd.trainer import SparseOPDConfig

    fields = {"output_dir": out, "use_cpu": True, "bf16": False, "report_to": "none", "save_strategy": "no",
              "seed": 0, "per_device_train_batch_size": 8, "max_completion_length": 48, "beta": 1.0,
              "temperature": 1.0, "logging_steps": 1000, "disable_tqdm": False, "gradient_checkpointing": False,
              "max_steps": 1}
    fields.update(overrides)
    return SparseOPDConfig(**fields)


def _student():
    from sparse_opd.embedded import load_embedded_model

    model, tokenizer = load_embedded_model()
    tokenizer.padding_side = "left"
    return model, tokenizer


def full_opd_update(data, steps: int, lr: float) -> dict[str, torch.Tensor]:
    """``|W_steps - W_0|`` per linear layer of a full OPD run (the teacher: the base weights with the solution)."""
    from sparse_opd.trainer import OPDTrainer
    from sparse_opd.trainer.probe import ProbeCallback

    model, tokenizer = _student()
    probe = ProbeCallback("update")
    with tempfile.TemporaryDirectory() as out:
        trainer = OPDTrainer(model=model, args=_args(out, max_steps=steps, learning_rate=lr), train_dataset=data,
                             processing_class=tokenizer, callbacks=[probe])
        trainer.train()
    return {n: s.clone() for n, s in probe.current_scores().items()}


def probe_scores(data, steps: int, lr: float) -> dict[str, torch.Tensor]:
    from sparse_opd.trainer import OPDTrainer
    from sparse_opd.trainer.probe import ProbeCallback

    model, tokenizer = _student()
    probe = ProbeCallback("update")
    with tempfile.TemporaryDirectory() as out:
        OPDTrainer(model=model, args=_args(out, max_steps=steps, learning_rate=lr), train_dataset=data,
                   processing_class=tokenizer, callbacks=[probe]).train()
    return {n: s.clone() for n, s in probe.current_scores().items()}


def gradient_scores(data, batches: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Dense per-module scores of every statistic from one discovery pass (and its report)."""
    from sparse_opd.masks.gradient_stats import STATISTICS
    from sparse_opd.trainer import SparseOPDTrainer

    model, tokenizer = _student()
    with tempfile.TemporaryDirectory() as out:
        trainer = SparseOPDTrainer(model=model, args=_args(out, mask_strategy="gradient", mask_gradient_steps=batches),
                                   train_dataset=data, processing_class=tokenizer)
        started = time.perf_counter()
        stats, tokens, micro = trainer.discovery.collect(trainer.get_train_dataloader(), statistics=STATISTICS)
        seconds = time.perf_counter() - started
    out = {}
    for statistic in STATISTICS:
        pieces = stats.scores(statistic, eps=trainer.args.adam_epsilon, keep=True)
        out[statistic] = {n: torch.cat([s for _, s in p]).reshape(stats.modules[n].shape) for n, p in pieces.items()}
    return out, {"tokens": tokens, "micro_batches": micro, "seconds": seconds}


def top_k(scores: dict[str, torch.Tensor], density: float, largest: bool = True):
    from sparse_opd.masks.budget import allocate_budget

    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    counts = allocate_budget(shapes, density=density, block_weights="ffn")
    return {n: set(torch.topk(s.reshape(-1), counts[n], largest=largest).indices.tolist()) for n, s in scores.items()}


def recall(candidate: dict[str, set], reference: dict[str, set]) -> float:
    hit = sum(len(candidate[n] & reference[n]) for n in reference)
    return hit / sum(len(r) for r in reference.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full_steps", type=int, default=24)
    parser.add_argument("--full_lr", type=float, default=2e-5)
    parser.add_argument("--batches", type=int, default=8, help="rollout batches scored by the gradient statistics")
    parser.add_argument("--probe_steps", type=int, default=4)
    parser.add_argument("--json", default=None, help="also write the results here")
    cli = parser.parse_args()
    from sparse_opd.tasks import arithmetic_dataset

    torch.manual_seed(0)
    data = arithmetic_dataset("train", 2000, 1, teacher_context="solution")
    reference = full_opd_update(data, cli.full_steps, cli.full_lr)
    gradients, report = gradient_scores(data, cli.batches)
    candidates = {f"gradient ({s})": scores for s, scores in gradients.items()}
    candidates["probe (AdamW, update)"] = probe_scores(data, cli.probe_steps, cli.full_lr)
    model, _ = _student()
    weights = dict(model.named_parameters())
    candidates["near_zero"] = {n: -weights[f"{n}.weight"].detach().abs() for n in reference}
    gen = torch.Generator().manual_seed(0)
    candidates["random"] = {n: torch.rand(s.shape, generator=gen) for n, s in reference.items()}
    results = {"discovery": report, "full_steps": cli.full_steps, "batches": cli.batches, "recall": {}}
    for density in DENSITIES:
        truth = top_k(reference, density)
        results["recall"][density] = {name: recall(top_k(s, density), truth) for name, s in candidates.items()}
    print(f"reference: top |W_{cli.full_steps} - W_0| of full OPD (AdamW {cli.full_lr:g}); gradient statistics from "
          f"{report['micro_batches']} rollout micro-batches ({report['tokens']} completion tokens, "
          f"{report['seconds']:.0f} s)\n")
    names = list(candidates)
    print("| density | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for density, row in results["recall"].items():
        print(f"| {100 * density:g}% | " + " | ".join(f"{100 * row[n]:.1f}%" for n in names) + " |")
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    assert all(math.isfinite(v) for row in results["recall"].values() for v in row.values())


if __name__ == "__main__":
    main()
