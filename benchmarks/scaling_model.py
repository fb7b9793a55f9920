"""Per-rank memory and communication of SparseDelta, LoRA and full fine-tuning, computed from a model's shapes.

    python benchmarks/scaling_model.py                       # Qwen3-1.7B and Qwen3-8B shapes on 8 ranks (tables)
    python benchmarks/scaling_model.py --measure             # also check the formulas against a 2-process FSDP2 run

Shapes come from transformers' own model classes built on the meta device (no download). Assumptions, per rank, with
the base in bf16 and sharding over all ranks (FSDP2 / ZeRO-3):

- base weights: 2 B/param / ranks for the adapters (full fine-tuning keeps its fp32 weights in its 16 B/param);
- trainable state: fp32 value (4 B) + fp32 gradient (4 B) + AdamW m and v (8 B) = 16 B per trainable element, sharded
  (full fine-tuning: fp32 sharded weights under a bf16 compute policy, or ZeRO-3's bf16 weights + fp32 master,
  come to the same 16 B/param; the bf16 copy of the base is then a transient of the all-gathers);
- SparseDelta's coordinates are buffers, not sharded: int64 compute indices (8 B) + the uint8 index stream (~1 B at
  1% density) per coordinate on every rank, + the int32 CSR pattern (4 B/coordinate) once the gradient-free
  generation path has run;
- gradient traffic per step: a reduce-scatter of the trainable gradients (fp32 for adapters, bf16 for full);
  ZeRO-3/FSDP2 also all-gather the bf16 base weights once in forward and once in backward (the same for all methods);
- gradient discovery (`mask_strategy="gradient"`) runs on the training adapter before its first step: the sparse
  training state, + two fp32 accumulators per adapted weight entry, reduce-scattered over the ranks (8 B / ranks),
  + one gradient block in flight (`grad_block_elements`, 2^24 entries: 64 MiB, and its reduce-scattered slice);
  the AdamW probe (`mask_strategy="probe"`) cannot shard: full fine-tuning's 16 B/param on one device, + a 4 B/entry
  copy of the starting adapted weights;
- vLLM sync per rollout round: TRL sends every parameter in bf16 for full fine-tuning and for PEFT adapters (it merges,
  reads the whole model, unmerges); sparse-opd sends only the adapted weights after the first sync (dense), or, to an
  engine that scatters coordinates (`sparse_payload`), only the k merged values in bf16 (2 B each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

GiB = 1024**3
BLOCK_ELEMENTS = 1 << 24  # SparseDeltaConfig.grad_block_elements: the largest gradient block formed at once
SHAPES = {
    "Qwen3-1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "Qwen3-8B": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}


def model_shapes(name: str) -> dict:
    """Parameter count, and the linear layers a sparse delta / LoRA adapts (every block linear, no head)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**SHAPES[name]))
    from sparse_opd.masks.targets import linear_modules, stored_shape

    linears = {n: stored_shape(m) for n, m in linear_modules(model).items()}
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "linears": linears}


def per_rank(shapes: dict, ranks: int, density: float = 0.01) -> dict:
    params = shapes["params"]
    adapted = sum(r * c for r, c in shapes["linears"].values())
    k = round(density * adapted)
    rank = max(1, round(k / sum(r + c for r, c in shapes["linears"].values())))  # LoRA rank of the same count
    lora = rank * sum(r + c for r, c in shapes["linears"].values())
    base = 2 * params / ranks
    rows = {
        "full fine-tuning": dict(trainable=params, memory=16 * params / ranks, grads_bytes=2 * params,
                                 sync_bytes=2 * params, sync_later=2 * params),
        f"LoRA r={rank} (TRL sync)": dict(trainable=lora, memory=base + 16 * lora / ranks, grads_bytes=4 * lora,
                                         sync_bytes=2 * params, sync_later=2 * params),
        f"SparseDelta {density:.0%}": dict(trainable=k, memory=base + 16 * k / ranks + 9 * k, grads_bytes=4 * k,
                                           sync_bytes=2 * params, sync_later=2 * adapted),
    }
    rows[f"SparseDelta {density:.0%}"].update(generation_extra=4 * k, sync_coordinates=2 * k, sync_indices_once=8 * k)
    block = 4 * BLOCK_ELEMENTS * (1 + 1 / ranks)
    sparse_memory = rows[f"SparseDelta {density:.0%}"]["memory"]
    discovery = {"gradient discovery (then SparseDelta)": dict(memory=sparse_memory + 8 * adapted / ranks + block),
                 "AdamW probe (one device, cannot shard)": dict(memory=16 * params + 4 * adapted)}
    for row in rows.values():
        row["gather_bytes"] = 2 * 2 * params  # ZeRO-3 / FSDP2: bf16 base all-gathered in forward and backward
    return {"params": params, "adapted": adapted, "k": k, "rows": rows, "discovery": discovery}


def table(name: str, ranks: int, density: float) -> str:
    result = per_rank(model_shapes(name), ranks, density)
    lines = [(f"### {name}: {result['params'] / 1e9:.2f}B parameters, {result['adapted'] / 1e9:.2f}B in adapted "
              f"linears, {ranks} ranks, bf16 base"), "",
             ("| method | trainable | per-rank memory (GiB) | gradient reduce / step (GiB) "
              "| base all-gathers / step (GiB) | vLLM sync, first / later rounds (GiB) |"),
             "|---|---:|---:|---:|---:|---:|"]
    for method, row in result["rows"].items():
        sync = f"{row['sync_bytes'] / GiB:.2f} / {row['sync_later'] / GiB:.2f}"
        if "sync_coordinates" in row:
            sync += (f" (coordinates only: {row['sync_coordinates'] / GiB:.3f}, "
                     f"+ {row['sync_indices_once'] / GiB:.2f} once)")
        lines.append(f"| {method} | {row['trainable'] / 1e6:,.1f}M | {row['memory'] / GiB:.2f} | "
                     f"{row['grads_bytes'] / GiB:.3f} | {row['gather_bytes'] / GiB:.2f} | {sync} |")
    sparse = result["rows"][f"SparseDelta {density:.0%}"]
    lines += ["", (f"SparseDelta's replicated coordinates: {9 * result['k'] / GiB:.2f} GiB per rank (int64 indices "
                   f"+ stream), + {sparse['generation_extra'] / GiB:.2f} GiB of CSR pattern once generation has run."),
              "",
              "| mask discovery | per-rank memory (GiB) | vs SparseDelta training |", "|---|---:|---:|"]
    for method, row in result["discovery"].items():
        lines.append(f"| {method} | {row['memory'] / GiB:.2f} | {row['memory'] / sparse['memory']:.2f}x |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ measured on the CPU
WORKER = r'''
import json, os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
dist.init_process_group("gloo")
from peft import LoraConfig, get_peft_model
import sparse_opd
from sparse_opd import SparseDeltaConfig
from sparse_opd.distributed import local_shard
from sparse_opd.embedded import load_embedded_model
method, density, rank_lora = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
model, _ = load_embedded_model(dtype=torch.float32 if method == "full" else torch.bfloat16)
if method == "sparse":
    model = get_peft_model(model, SparseDeltaConfig(mask_init="random", mask_density=density))
elif method == "lora":
    model = get_peft_model(model, LoraConfig(r=rank_lora, target_modules="all-linear"))
else:
    model.requires_grad_(True)
for layer in model.modules():
    if type(layer).__name__ == "LlamaDecoderLayer":
        fully_shard(layer)
fully_shard(model)
trainable = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(trainable, lr=1e-5)
ids = torch.randint(0, 1000, (1, 8))
model(input_ids=ids, labels=ids).loss.backward(); opt.step()
def nbytes(ts): return sum(local_shard(t).numel() * local_shard(t).element_size() for t in ts)
frozen = nbytes(p for p in model.parameters() if not p.requires_grad)
train = nbytes(trainable)
grads = nbytes(p.grad for p in trainable if p.grad is not None)
state = sum(nbytes(v for v in s.values() if torch.is_tensor(v) and v.dim() > 0) for s in opt.state.values())
buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "sparse_delta" in n)
out = dict(frozen=frozen, trainable=train, grads=grads, optimizer=state, coordinate_buffers=buffers)
if dist.get_rank() == 0:
    print(json.dumps(out))
dist.destroy_process_group()
'''


def measure(density: float = 0.01) -> str:
    from sparse_opd.embedded import load_embedded_model

    model, _ = load_embedded_model()
    from sparse_opd.masks.targets import linear_modules, stored_shape

    linears = {n: stored_shape(m) for n, m in linear_modules(model).items()}
    shapes = {"params": sum(p.numel() for p in model.parameters()), "linears": linears}
    predicted = per_rank(shapes, 2, density)
    rank = max(1, round(predicted["k"] / sum(r + c for r, c in linears.values())))
    lines = ["| SmolLM2-135M, 2 ranks, FSDP2 | predicted per rank (MiB) | measured on rank 0 (MiB) |",
             "|---|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        for method, label in (("sparse", f"SparseDelta {density:.0%}"), ("lora", f"LoRA r={rank} (TRL sync)"),
                              ("full", "full fine-tuning")):
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                   "--standalone", script, method, str(density), str(rank)],
                                  capture_output=True, text=True, env=env, check=True)
            got = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
            row = predicted["rows"][label]
            measured = got["frozen"] + got["trainable"] + got["grads"] + got["optimizer"] + got["coordinate_buffers"]
            lines.append(f"| {label} | {row['memory'] / 2**20:.1f} | {measured / 2**20:.1f} "
                         f"(frozen {got['frozen'] / 2**20:.1f}, trainable+grads+AdamW "
                         f"{(got['trainable'] + got['grads'] + got['optimizer']) / 2**20:.1f}, coordinates "
                         f"{got['coordinate_buffers'] / 2**20:.1f}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=8, help="data-parallel ranks sharing the model")
    parser.add_argument("--density", type=float, default=0.01, help="SparseDelta density of the adapted linears")
    parser.add_argument("--measure", action="store_true", help="also measure a 2-process FSDP2 run of SmolLM2")
    args = parser.parse_args(argv)
    for name in SHAPES:
        print(table(name, args.ranks, args.density), end="\n\n")
    if args.measure:
        print(measure(args.density))


if __name__ == "__main__":
    main()
