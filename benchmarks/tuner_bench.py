"""SparseDelta against LoRA, PEFT's SHiRA and Supertuning, and full fine-tuning: one table from one run.

    python benchmarks/tuner_bench.py [--models tiny smollm2] [--threads 1] [--steps 3] [--out docs/tuner_bench.json]

Each (model, budget, method) runs in its own process, so peak RSS is that method's alone. All linear layers of the
transformer blocks are adapted; batch 4 x 128 tokens; AdamW. Budgets: "lora16" gives every sparse method the
trainable count of LoRA r=16 (r * (m + n) per matrix); "1%" gives the sparse methods 1% of each matrix and LoRA the
rank with the closest count. Columns:

- step: median seconds of forward + backward + AdamW step; fwd: median seconds of an unmerged no-grad forward;
- rss: peak resident memory of the process (MiB) after the timed steps;
- saved: MiB of tensors autograd saves for backward that are not parameters or buffers (activations and copies);
- B/coord: bytes of the saved adapter file per trained coordinate;
- merge err fp32 / bf16: max |W - W0| after merge then unmerge with non-zero adapter values.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["sparse_delta", "lora", "shira", "supertuning", "full"]
BATCH, SEQ = 4, 128


# ---------------------------------------------------------------------------------------------------- worker side
def load_model(name: str, dtype):
    import torch
    import transformers

    if name == "tiny":
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=2048, max_position_embeddings=256,
        )
        return transformers.LlamaForCausalLM(config).to(dtype)
    from sparse_opd.embedded import embedded_model_path

    return transformers.AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=dtype)


def target_shapes(model):
    import torch

    return {
        n: tuple(m.weight.shape)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS
    }


def lora_rank_for(shapes, density):
    total = sum(r * c for r, c in shapes.values())
    return max(1, round(density * total / sum(r + c for r, c in shapes.values())))


def wrap(model, method: str, budget: str, init_weights: bool):
    import torch
    from peft import LoraConfig, ShiraConfig, SupertuningConfig, get_peft_model

    from sparse_opd import SparseDeltaConfig, SparseMask

    shapes = target_shapes(model)
    r = 16 if budget == "lora16" else lora_rank_for(shapes, 0.01)
    counts = {n: (16 * (a + b) if budget == "lora16" else max(1, round(0.01 * a * b))) for n, (a, b) in shapes.items()}
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "lora":
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                init_lora_weights=init_weights))
    if method == "shira":
        return get_peft_model(model, ShiraConfig(r=r, target_modules=TARGETS, random_seed=0,
                                                 init_weights=init_weights))
    if method == "supertuning":
        density = sum(counts.values()) / sum(a * b for a, b in shapes.values())
        return get_peft_model(model, SupertuningConfig(sparsity=1 - density, target_modules=TARGETS,
                                                       init_weights=init_weights))
    if method == "sparse_delta":
        gen = torch.Generator().manual_seed(0)
        mask = SparseMask(
            {n: torch.randperm(a * b, generator=gen)[: counts[n]] for n, (a, b) in shapes.items()}, shapes
        )
        return get_peft_model(model, SparseDeltaConfig(mask=mask, init_weights=init_weights))
    raise ValueError(method)


def median_time(fn, steps):
    fn()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def saved_for_backward_bytes(model, batch):
    import torch

    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    own |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen = {}

    def pack(t):
        if t.layout != torch.strided:  # e.g. SHiRA's sparse COO delta
            seen[id(t)] = t._values().nbytes + t._indices().nbytes
            return t
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def merge_error(model_name, method, budget, dtype):
    import torch

    if method == "full":
        return None
    model = wrap(load_model(model_name, dtype), method, budget, init_weights=False)
    with torch.no_grad():  # make sure every adapter parameter is non-zero
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and p.dim() == 2}
    model.merge_adapter()
    model.unmerge_adapter()
    after = dict(model.named_parameters())
    return max((after[n].detach().float() - w.float()).abs().max().item() for n, w in before.items())


def worker(args):
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = wrap(load_model(args.model, torch.float32), args.method, args.budget, init_weights=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size if hasattr(model, "config") else 2048
    batch = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()

    step_s = median_time(step, args.steps)
    saved = saved_for_backward_bytes(model, batch)
    model.eval()
    with torch.no_grad():
        fwd_s = median_time(lambda: model(input_ids=batch), args.steps)
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        name = "model.safetensors" if args.method == "full" else "adapter_model.safetensors"
        files = [f for f in os.listdir(tmp) if f.endswith(".safetensors")]
        if name in files:
            size = os.path.getsize(os.path.join(tmp, name))
        else:
            size = sum(os.path.getsize(os.path.join(tmp, f)) for f in files)
    model = opt = None  # free both before the merge-error models load (`del` would leave step()'s closure unbound)
    row = dict(
        model=args.model, budget=args.budget, method=args.method, trainable=trainable, step_s=step_s, fwd_s=fwd_s,
        rss_mib=rss_mib, saved_mib=saved / 2**20, bytes_per_coord=size / trainable,
        merge_err_fp32=merge_error(args.model, args.method, args.budget, torch.float32),
        merge_err_bf16=merge_error(args.model, args.method, args.budget, torch.bfloat16),
    )
    print(json.dumps(row))


# ---------------------------------------------------------------------------------------------------- driver side
def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def print_table(rows):
    print("| model | budget | method | trainable | step s | step / LoRA | fwd s | fwd / LoRA | peak RSS MiB "
          "| saved MiB | B/coord | merge err fp32 | merge err bf16 |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        lora = next((r for r in rows if r["model"] == row["model"] and r["budget"] == row["budget"]
                     and r["method"] == "lora"), None)
        step_ratio = row["step_s"] / lora["step_s"] if lora else None
        fwd_ratio = row["fwd_s"] / lora["fwd_s"] if lora else None
        print(
            f"| {row['model']} | {row['budget']} | {row['method']} | {row['trainable']:,} | {row['step_s']:.3f} | "
            f"{fmt(step_ratio, '.2f')}x | {row['fwd_s']:.3f} | {fmt(fwd_ratio, '.2f')}x | {row['rss_mib']:.0f} | "
            f"{row['saved_mib']:.1f} | {row['bytes_per_coord']:.2f} | {fmt(row['merge_err_fp32'], '.1e')} | "
            f"{fmt(row['merge_err_bf16'], '.1e')} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--budgets", nargs="+", default=["lora16", "1%"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--budget", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for model in args.models:
        for budget in args.budgets:
            for method in args.methods:
                if method == "full" and budget != args.budgets[0]:
                    continue  # full fine-tuning has no budget: measure it once per model
                cmd = [sys.executable, __file__, "--worker", "--model", model, "--budget", budget, "--method", method,
                       "--threads", str(args.threads), "--steps", str(args.steps)]
                result = subprocess.run(cmd, capture_output=True, text=True)
                if result.returncode != 0:
                    print(f"{model}/{budget}/{method} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = json.loads(result.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"done {model}/{budget}/{method}: step {row['step_s']:.3f}s", file=sys.stderr, flush=True)
    print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
