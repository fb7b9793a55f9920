"""Tiny models built from configs (no Hub)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 97


def tiny_config(kind: str):
    if kind == "llama":
        return transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=64,
        )
    if kind == "qwen2":
        return transformers.Qwen2Config(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=64,
        )
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    raise ValueError(kind)


def make_model(kind: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(kind)).to(dtype)
    model.eval()
    return model


MODEL_KINDS = ["llama", "qwen2", "gpt2"]
