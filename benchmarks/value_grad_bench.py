"""Which value-gradient method wins at which density: blockwise dense gather vs sampled dot products.

    python benchmarks/value_grad_bench.py [--tokens 512] [--shape 1536 576] [--threads 1]

Prints the time of each method for one weight gradient (the SmolLM2-135M up/gate shape by default) and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from sparse_opd.tuner.functional import gathered_weight_grad_dense, gathered_weight_grad_sampled

DENSITIES = (0.0001, 0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.15, 0.2, 0.3)


def best_of(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--shape", type=int, nargs=2, default=(1536, 576))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, cols = args.shape
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(args.tokens, rows, generator=gen), torch.randn(args.tokens, cols, generator=gen)
    print(f"weight {rows}x{cols}, {args.tokens} tokens, {args.threads} thread(s)\n")
    print("| density | dense (ms) | sampled (ms) | sampled / dense | faster |")
    print("|---:|---:|---:|---:|---|")
    for density in DENSITIES:
        k = max(1, int(rows * cols * density))
        idx = torch.sort(torch.randperm(rows * cols, generator=gen)[:k]).values
        dense = best_of(lambda idx=idx: gathered_weight_grad_dense(a, b, idx, (rows, cols), 1 << 24))
        sampled = best_of(lambda idx=idx: gathered_weight_grad_sampled(a, b, idx, (rows, cols), 1 << 24))
        winner = "sampled" if sampled < dense else "dense"
        print(f"| {density:g} | {dense * 1e3:.1f} | {sampled * 1e3:.1f} | {sampled / dense:.2f} | {winner} |")


if __name__ == "__main__":
    main()
