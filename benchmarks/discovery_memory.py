"""Peak memory of mask discovery against sparse training, LoRA and full OPD on the embedded SmolLM2-135M-Instruct.

    python benchmarks/discovery_memory.py                 # cpu preset's batch (8) and completion length (48), fp32
    python benchmarks/discovery_memory.py --steps 2 --json outputs/discovery_memory.json

Each method runs in a fresh process (the same model, data, teacher, batch and generation length) and reports its
peak resident memory (`ru_maxrss`) at the end of each phase: gradient discovery (`mask_strategy="gradient"`, before
its first training step), the AdamW probe (`mask_strategy="probe"`, once the probe's dense steps are done), and
`--steps` training steps of sparse OPD (1%, the near-zero prior: no discovery), LoRA OPD (the same trainable count)
and full OPD. The goal of issue 20: discovery's peak <= sparse training's peak + 8 B per adapted weight entry.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

METHODS = ("sparse", "gradient", "probe", "lora", "full")
MiB = 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(method: str, steps: int, density: float) -> dict:
    import torch
    from transformers import TrainerCallback

    from sparse_opd.embedded import load_embedded_model
    from sparse_opd.masks.targets import linear_modules, stored_shape
    from sparse_opd.tasks import arithmetic_dataset
    from sparse_opd.trainer import OPDTrainer, SparseOPDConfig, SparseOPDTrainer

    torch.manual_seed(0)
    model, tokenizer = load_embedded_model()
    tokenizer.padding_side = "left"
    shapes = {n: stored_shape(m) for n, m in linear_modules(model).items()}
    adapted = sum(r * c for r, c in shapes.values())
    data = arithmetic_dataset("train", 256, 1, teacher_context="solution")
    out = {"method": method, "adapted_entries": adapted, "after_load_mib": peak_mib()}

    class Phases(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            out.setdefault("before_first_step_mib", peak_mib())

    with tempfile.TemporaryDirectory() as tmp:
        fields = {"output_dir": tmp, "use_cpu": True, "bf16": False, "report_to": "none", "save_strategy": "no",
                  "seed": 0, "per_device_train_batch_size": 8, "max_completion_length": 48, "max_steps": steps,
                  "logging_steps": 1000, "disable_tqdm": True, "gradient_checkpointing": False,
                  "mask_density": density, "learning_rate": 2e-3, "mask_gradient_steps": 4, "mask_probe_steps": 4,
                  "mask_probe_learning_rate": 2e-5}
        if method in ("sparse", "gradient", "probe"):
            strategy = {"sparse": "near_zero"}.get(method, method)
            trainer = SparseOPDTrainer(model=model, args=SparseOPDConfig(**fields, mask_strategy=strategy),
                                       train_dataset=data, processing_class=tokenizer, callbacks=[Phases()])
            out["after_setup_mib"] = peak_mib()  # the probe runs here
        else:
            peft_config = None
            if method == "lora":
                from peft import LoraConfig

                rank = max(1, round(density * adapted / sum(r + c for r, c in shapes.values())))
                peft_config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
                out["lora_rank"] = rank
            fields["learning_rate"] = 2e-5 if method == "full" else 2e-3
            trainer = OPDTrainer(model=model, args=SparseOPDConfig(**fields), train_dataset=data,
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=[Phases()])
        trainer.train()
    out["trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    out["end_mib"] = peak_mib()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="training steps of each method")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.child:
        print("RESULT " + json.dumps(child(cli.child, cli.steps, cli.density)), flush=True)
        return
    results = {}
    for method in cli.methods:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run([sys.executable, __file__, "--child", method, "--steps", str(cli.steps), "--density",
                               str(cli.density)], check=False, capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
        results[method] = json.loads(lines[-1][len("RESULT "):])
        print(f"{method}: {results[method]}", flush=True)
    print(table(results))
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump(results, f, indent=1)


def table(results: dict) -> str:
    sparse = results.get("sparse", {}).get("end_mib")
    adapted = next(iter(results.values()))["adapted_entries"]
    lines = ["| method | phase | peak RSS (MiB) | vs sparse training | above sparse training, B per adapted entry |",
             "|---|---|---:|---:|---:|"]
    phases = {"sparse": ("end_mib", "training"), "gradient": ("before_first_step_mib", "discovery"),
              "probe": ("after_setup_mib", "discovery (dense AdamW)"), "lora": ("end_mib", "training"),
              "full": ("end_mib", "training")}
    for method, result in results.items():
        key, phase = phases[method]
        peak = result[key]
        ratio = f"{peak / sparse:.2f}x" if sparse else ""
        extra = f"{(peak - sparse) * MiB / adapted:+.1f}" if sparse else ""
        label = {"sparse": "sparse OPD 1% (near_zero)", "gradient": "gradient discovery (snr)",
                 "probe": "AdamW probe", "lora": f"LoRA OPD r={result.get('lora_rank')}",
                 "full": "full OPD"}[method]
        lines.append(f"| {label} | {phase} | {peak:.0f} | {ratio} | {extra} |")
        if method in ("gradient", "probe"):
            lines.append(f"| {label} | then training | {result['end_mib']:.0f} | "
                         f"{result['end_mib'] / sparse:.2f}x | |" if sparse else "")
    return "\n".join(line for line in lines if line)


if __name__ == "__main__":
    main()
