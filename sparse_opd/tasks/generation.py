"""Batched generation for evaluation: prompts tokenized the way TRL's trainers tokenize them, greedy or sampled.

A prompt is a list of chat messages (rendered with the tokenizer's chat template and the generation prompt, with any
`chat_template_kwargs` such as Qwen3's `enable_thinking`) or a plain string (tokenized as is, with the tokenizer's
special tokens), as in `trl.DistillationTrainer`.

The caller may pass a `generation_context`: a function of the model returning a context manager to generate under
(for a sparse delta, `sparse_opd.tuner.merged_sparse_delta` merges it for speed and restores the weights exactly).
Without one the model generates as it is, which suits any plain or PEFT model.
"""

from __future__ import annotations

import contextlib

import torch


def tokenize_prompts(tokenizer, prompts: list, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Token ids of each prompt: chat messages through the chat template (generation prompt added), text as is."""
    ids = []
    for prompt in prompts:
        if isinstance(prompt, list):
            rendered = tokenizer.apply_chat_template(
                prompt, tokenize=True, add_generation_prompt=True, return_dict=True, **(chat_template_kwargs or {})
            )
            ids.append(list(rendered["input_ids"]))
        elif isinstance(prompt, str):
            ids.append(list(tokenizer(prompt)["input_ids"]))
        else:
            raise TypeError(f"a prompt is a string or a list of chat messages, got {type(prompt).__name__}")
    return ids


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every end-of-sequence id the model's generation config declares, and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` of token rows left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


def _sampling_kwargs(sampling: dict | None) -> dict:
    if not sampling or not sampling.get("temperature"):
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    top_k = sampling.get("top_k") or None  # TRL's top_k=0 means no top-k filtering
    return {"do_sample": True, "temperature": sampling["temperature"], "top_p": sampling.get("top_p", 1.0),
            "top_k": top_k}


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 32,
    sampling: dict | None = None,
    generation_context=None,
    progress: str | None = None,
) -> list[list[int]]:
    """Completion token ids for each prompt, in the order given, each ending at its first stop token (kept).

    `sampling`: None (greedy) or ``{"temperature": t, "top_p": p, "top_k": k}`` as in TRL's generation settings
    (temperature 0 is greedy). Prompts are batched by length (less padding) and left-padded.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = stop_token_ids(model, tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    outputs: list[list[int] | None] = [None] * len(prompt_ids)
    was_training = model.training
    model.eval()
    context = generation_context(model) if generation_context is not None else contextlib.nullcontext(model)
    with contextlib.ExitStack() as stack:
        stack.callback(model.train, was_training)
        ready = stack.enter_context(context)
        ready = model if ready is None else ready
        device = next(ready.parameters()).device
        starts = range(0, len(order), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=progress, unit="batch", dynamic_ncols=True)
        for start in starts:
            batch = order[start : start + batch_size]
            ids, mask = left_pad([prompt_ids[i] for i in batch], tokenizer.pad_token_id)
            generated = ready.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                **_sampling_kwargs(sampling),
            )
            for row, i in enumerate(batch):
                tokens = generated[row, ids.shape[1] :].tolist()
                stops = [k for k, t in enumerate(tokens) if t in eos]
                outputs[i] = tokens[: stops[0] + 1] if stops else tokens
    return outputs


def generate_completions(
    model,
    tokenizer,
    prompts: list,
    batch_size: int = 32,
    max_new_tokens: int = 96,
    chat_template_kwargs: dict | None = None,
    progress: str | None = None,
    generation_context=None,
) -> list[str]:
    """Greedy completions (decoded without special tokens) for chat or text prompts, in the order given."""
    ids = tokenize_prompts(tokenizer, prompts, chat_template_kwargs)
    completions = generate_ids(model, tokenizer, ids, max_new_tokens, batch_size, None, generation_context, progress)
    return [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
