"""Time and peak RSS of a full analysis: SmolLM2-135M vs a perturbed copy, and a 1.7B-shaped synthetic pair.

    python benchmarks/analysis_bench.py smollm2 [--workdir /tmp/mask_diff_bench]
    python benchmarks/analysis_bench.py synthetic-1.7b [--layers 28] [--threads 1]

Prints wall time and process CPU time (all threads); with `--threads 1` the CPU time is the single-core cost even
when other work shares the machine.

`smollm2` reuses the sharded pair written by benchmarks/mask_diff_bench.py (10% of linear entries moved by
N(0, 1e-4^2)). `synthetic-1.7b` streams Qwen3-1.7B-shaped matrices (hidden 2048, FFN 6144, 28 layers, 16/8 heads of
128) generated on the fly as in-memory state dicts one layer at a time, so only the analysis is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def smollm2(workdir: str):
    from sparse_opd.analysis import analyze_delta

    return analyze_delta(os.path.join(workdir, "base"), os.path.join(workdir, "tuned"), progress=False, device="cpu")


def synthetic(layers: int):
    from sparse_opd.analysis import DeltaReport, analyze_matrix

    shapes = {"self_attn.q_proj": (2048, 2048), "self_attn.k_proj": (1024, 2048), "self_attn.v_proj": (1024, 2048),
              "self_attn.o_proj": (2048, 2048), "mlp.gate_proj": (6144, 2048), "mlp.up_proj": (6144, 2048),
              "mlp.down_proj": (2048, 6144)}
    gen = torch.Generator().manual_seed(0)
    report = DeltaReport(source={"base": "synthetic", "tuned": "synthetic", "kind": "synthetic"})
    for layer in range(layers):
        for kind, shape in shapes.items():
            w = torch.randn(shape, generator=gen) * 0.02
            d = torch.randn(shape, generator=gen) * 1e-5 * (torch.rand(shape, generator=gen) < 0.2)
            report.rows.append(analyze_matrix(f"model.layers.{layer}.{kind}", w, d))
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=("smollm2", "synthetic-1.7b"))
    parser.add_argument("--workdir", default="/tmp/mask_diff_bench")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.measure:
        if args.which == "smollm2" and not os.path.isdir(os.path.join(args.workdir, "tuned")):
            subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "mask_diff_bench.py"),
                            "--workdir", args.workdir], check=True)
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--measure"], capture_output=True, text=True,
                             check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {args.which} | {row['matrices']} matrices | {row['seconds']:.1f} s | {row['cpu_seconds']:.1f} s | "
              f"peak RSS {row['rss']:.0f} MiB | {args.threads} threads |")
        print("\n" + row["summary"])
        return
    torch.set_num_threads(args.threads)
    start, cpu_start = time.perf_counter(), time.process_time()
    report = smollm2(args.workdir) if args.which == "smollm2" else synthetic(args.layers)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds,
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "matrices": len(report.rows), "summary": report.summary()}))


if __name__ == "__main__":
    main()
