"""A tiny OPD setup for the trainer, task, job and docs tests: an offline word-level tokenizer covering the synthetic
task, 2-layer Llama and GPT-2 models with its vocabulary, a student and a teacher it can move towards, and the
trainer arguments the in-process trainer tests start from."""

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


def student_model(tokenizer):
    """The tiny student, with a sharpened output head so that its next-token distributions are not flat."""
    model = tiny_llama(tokenizer, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def peaked_teacher(tokenizer):
    """The student with every block weight perturbed: a teacher the student's sparse delta can move towards."""
    teacher = student_model(tokenizer)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            if "layers." in name and param.ndim == 2:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    return teacher


def make_args(tmp_path, **overrides):
    """`SparseOPDConfig` for a few CPU steps on the tiny models (near-zero mask at 20%), with ``overrides``."""
    from sparse_opd.trainer import SparseOPDConfig

    defaults = {
        "output_dir": str(tmp_path / "out"),
        "mask_strategy": "near_zero",
        "mask_density": 0.2,
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "logging_steps": 1,
        "max_completion_length": 8,
        "learning_rate": 2e-2,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    defaults.update(overrides)
    return SparseOPDConfig(**defaults)
