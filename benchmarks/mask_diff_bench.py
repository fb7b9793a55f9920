"""Time and peak RSS of `SparseMask.from_diff` on the embedded SmolLM2-135M against a perturbed, sharded copy.

    python benchmarks/mask_diff_bench.py [--workdir /tmp/mask_diff_bench] [--shard-size 100MB]

Writes the base (fp32) and a copy where 10% of every linear weight's entries moved by N(0, 1e-4^2), both in shards,
then runs `from_diff` in a fresh process and reports its wall time and peak RSS next to the largest tensor and the
checkpoint size. Streaming means the peak should track one or two tensors, not the model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def prepare(workdir: str, shard_size: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from sparse_opd.embedded import embedded_model_path

    if os.path.isdir(os.path.join(workdir, "tuned")):
        return
    model = AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32)
    model.save_pretrained(os.path.join(workdir, "base"), max_shard_size=shard_size)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                w = module.weight.view(-1)
                idx = torch.randperm(w.numel(), generator=gen)[: w.numel() // 10]
                w[idx] += torch.randn(idx.numel(), generator=gen) * 1e-4
    model.save_pretrained(os.path.join(workdir, "tuned"), max_shard_size=shard_size)


def measure(workdir: str) -> None:
    from sparse_opd import SparseMask

    start = time.perf_counter()
    mask, report = SparseMask.from_diff(os.path.join(workdir, "base"), os.path.join(workdir, "tuned"),
                                        return_report=True)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "coordinates": mask.count(), "kept_fraction": report.total_fraction}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/mask_diff_bench")
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.workdir)
    prepare(args.workdir, args.shard_size)
    from safetensors import safe_open

    from sparse_opd.masks.checkpoints import checkpoint_files

    files = checkpoint_files(os.path.join(args.workdir, "base"))
    largest = 0
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open)
                sl = f.get_slice(key)
                numel = 1
                for s in sl.get_shape():
                    numel *= s
                largest = max(largest, numel * 4)
    size = sum(os.path.getsize(p) for p in files)
    rss = "import resource, sparse_opd, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    baseline = subprocess.run([sys.executable, "-c", rss],
                              capture_output=True, text=True, check=True)
    result = subprocess.run([sys.executable, __file__, "--measure", "--workdir", args.workdir], capture_output=True,
                            text=True, check=True)
    row = json.loads(result.stdout.strip().splitlines()[-1])
    print("| checkpoint | shards | largest tensor | import baseline RSS | from_diff peak RSS | time | kept |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {size / 2**20:.0f} MiB | {len(files)} | {largest / 2**20:.0f} MiB | {float(baseline.stdout):.0f} MiB | "
          f"{row['peak_rss_mib']:.0f} MiB | {row['seconds']:.1f} s | {row['coordinates']:,} "
          f"({row['kept_fraction']:.2%}) |")


if __name__ == "__main__":
    main()
