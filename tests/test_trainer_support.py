"""Shared helpers of the trainer / task / example tests: an offline word-level tokenizer and tiny models.

No tests here; the `test_` prefix keeps the file among the trainer's test files.
"""

from __future__ import annotations

import functools
import re

import torch

from sparse_opd.tasks.arithmetic import _ADD, _DIV, _ITEMS, _MUL, _NAMES, _SUB, INSTRUCTION

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>"]


def _words() -> list[str]:
    text = " ".join([*_NAMES, *_ITEMS, *_ADD, *_SUB, *_MUL, *_DIV, INSTRUCTION])
    text += " How many does have now ? Answer : Reference solution ( check your work against it ) Now the problem ."
    text += " Example solution user assistant system who n items = + - * / {}"
    words = set(re.findall(r"[A-Za-z]+|[^\sA-Za-z0-9]", text))
    return sorted(words) + [str(d) for d in range(10)] + ["\n"]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL + _words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"<\|im_start\|>|<\|im_end\|>"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"[0-9]|[^A-Za-z0-9<>|_]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return tok.to_str()


def tiny_tokenizer():
    """A word-level tokenizer covering the synthetic task's words and digits, with a ChatML template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<unk>",
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(tokenizer, seed: int = 0, layers: int = 2):
    """A 2-layer Llama with the tokenizer's vocabulary (a few hundred thousand parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def tiny_gpt2(tokenizer, seed: int = 0, dropout: float = 0.0):
    """A 2-layer GPT-2 (absolute position embeddings, Conv1D layers) with the tokenizer's vocabulary; GPT-2 ships with
    0.1 dropout on embeddings, residuals and attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=512, resid_pdrop=dropout,
        embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
