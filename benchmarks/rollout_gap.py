"""How far the sampled tokens' log-probabilities under generation are from the training forward's, on the embedded
SmolLM2-135M-Instruct in float32 and in bfloat16 (the `rollout/logp_abs_diff` metrics the trainer logs).

    python benchmarks/rollout_gap.py                      # fp32 and bf16, 8 steps each, the cpu preset's batch
    python benchmarks/rollout_gap.py --dtypes bf16 --steps 4

Each step logs the token-weighted mean and the maximum of |log p_generation - log p_training| over its sampled
tokens. Prints a Markdown table per dtype (recorded in docs/trainer.md) and the device it ran on.
"""

from __future__ import annotations

import argparse
import platform
import tempfile

import torch


def run(dtype: str, steps: int) -> list[dict]:
    from sparse_opd.embedded import load_embedded_model
    from sparse_opd.tasks import arithmetic_dataset
    from sparse_opd.trainer import SparseOPDConfig, SparseOPDTrainer

    torch.manual_seed(0)
    model, tokenizer = load_embedded_model(dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    tokenizer.padding_side = "left"
    data = arithmetic_dataset("train", 256, 1, teacher_context="solution")
    with tempfile.TemporaryDirectory() as out:
        args = SparseOPDConfig(output_dir=out, use_cpu=not torch.cuda.is_available(), bf16=dtype == "bf16",
                               report_to="none", save_strategy="no", seed=0, per_device_train_batch_size=8,
                               max_completion_length=48, max_steps=steps, logging_steps=1, learning_rate=2e-3,
                               mask_strategy="near_zero", mask_density=0.01, disable_tqdm=True,
                               gradient_checkpointing=False)
        trainer = SparseOPDTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
    return [{k: h[k] for k in ("step", "rollout/logp_abs_diff", "rollout/logp_abs_diff_max", "rollout/logp_diff")}
            for h in trainer.state.log_history if "rollout/logp_abs_diff" in h]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=8)
    cli = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    print(f"device: {device}; torch {torch.__version__}\n")
    for dtype in cli.dtypes:
        rows = run(dtype, cli.steps)
        print(f"### {dtype}\n\n| step | mean abs gap (nats) | max abs gap | mean signed gap |\n|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['step']} | {r['rollout/logp_abs_diff']:.2e} | {r['rollout/logp_abs_diff_max']:.2e} | "
                  f"{r['rollout/logp_diff']:+.2e} |")
        means = [r["rollout/logp_abs_diff"] for r in rows]
        print(f"\nover {len(rows)} steps: mean {sum(means) / len(means):.2e}, largest max "
              f"{max(r['rollout/logp_abs_diff_max'] for r in rows):.2e}\n")


if __name__ == "__main__":
    main()
