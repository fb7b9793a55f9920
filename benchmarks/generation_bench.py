"""Generation speed with an unmerged adapter: SparseDelta against the bare base model, LoRA and SHiRA, in fp32 and
bf16.

    python benchmarks/generation_bench.py [--model smollm2|tiny] [--dtypes float32 bfloat16] [--threads 2]

Greedy `generate` of `--new-tokens` tokens for a batch of prompts, median of `--repeats` timed runs after a warm-up;
the adapters are unmerged, with non-zero values, on every linear layer of the transformer blocks, at 1% of each
weight (SparseDelta, SHiRA) or the LoRA rank of the same count. Rows:

- base: the bare model; sparse_delta: the tuner's gradient-free path (O(k) per token, no dense delta);
- sparse_delta (dense delta per token): the same adapter forced through the training path, which builds a dense
  delta (fp32: the transient W + delta) per layer per decoded token (what the sparse path replaced);
- sparse_delta merged (fp32): the exact merge the trainer uses for fp32 rollouts;
- lora, shira: PEFT's unmerged forwards at the same trainable count.

The ratio column is tokens/s against the base model of the same dtype, measured in the same process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from tuner_bench import TARGETS, load_model, lora_rank_for, target_shapes


def build(model_name: str, method: str, dtype):
    from peft import LoraConfig, ShiraConfig, get_peft_model

    from sparse_opd import SparseDeltaConfig
    from sparse_opd.masks import random_mask

    model = load_model(model_name, dtype).eval()
    if method == "base":
        return model
    shapes = target_shapes(model)
    if method == "lora":
        r = lora_rank_for(shapes, 0.01)
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                      init_lora_weights=False))
    elif method == "shira":
        r = lora_rank_for(shapes, 0.01)
        peft_model = get_peft_model(model, ShiraConfig(r=r, target_modules=TARGETS, random_seed=0,
                                                       init_weights=False))
    else:
        mask = random_mask(model, density=0.01, target_modules=TARGETS, seed=0)
        peft_model = get_peft_model(model, SparseDeltaConfig(mask=mask, init_weights=False))
        if method == "sparse_delta_dense":
            for config in peft_model.peft_config.values():
                config.grad_block_elements = 0
            for module in peft_model.modules():
                for name, spec in getattr(module, "delta_specs", {}).items():
                    module.delta_specs[name] = type(spec)(**{**spec.__dict__, "block_elements": 0})
        if method == "sparse_delta_merged":
            peft_model.merge_adapter()
    return peft_model.eval()


def tokens_per_second(model, batch: int, prompt_length: int, new_tokens: int, repeats: int) -> float:
    import torch

    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt_length), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, **kwargs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(ids, **kwargs)
            times.append(time.perf_counter() - start)
    return batch * new_tokens / statistics.median(times)


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"], help="embedded SmolLM2 or tiny")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="base model dtypes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--batch", type=int, default=8, help="prompts generated together")
    parser.add_argument("--prompt-length", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"model {args.model}, batch {args.batch}, prompt {args.prompt_length}, {args.new_tokens} new tokens, "
          f"{args.threads} threads, torch {torch.__version__}\n")
    print("| dtype | method | tokens/s | vs base |\n|---|---|---:|---:|")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        methods = ["base", "sparse_delta", "sparse_delta_dense", "lora", "shira"]
        if dtype == torch.float32:
            methods.insert(2, "sparse_delta_merged")
        base = None
        for method in methods:
            speed = tokens_per_second(build(args.model, method, dtype), args.batch, args.prompt_length,
                                      args.new_tokens, args.repeats)
            base = base or speed
            label = {"sparse_delta_dense": "sparse_delta (dense delta per token)",
                     "sparse_delta_merged": "sparse_delta merged"}.get(method, method)
            print(f"| {name} | {label} | {speed:.1f} | {speed / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
