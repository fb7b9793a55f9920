"""On-policy, measured: the log-probability of every sampled token under the generation path against the training
forward, logged every logging step.

Rollouts must come from the policy being trained. The generation path and the training forward compute the same
function with different kernels (a token at a time with a KV cache, or vLLM with its own weights and kernels), so
they agree only to rounding. `RolloutCheckMixin` records, for every sampled completion token, ``log p_gen``: the
sampling distribution at temperature ``T`` before top-k / top-p truncation, from transformers' `generate` (a logits
processor) or from vLLM (its "processed" log-probabilities, `logprobs=0`). In the loss it computes ``log p_train``
from the student's hidden states of the training forward, projected as TRL's divergence projects them, and
accumulates ``|log p_gen - log p_train|`` over the logging window. It logs ``rollout/logp_abs_diff`` (the mean over
every sampled token of every micro-batch and rank in the window), ``rollout/logp_abs_diff_max`` (their maximum) and
``rollout/logp_diff`` (the signed mean).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from trl.trainer.utils import pad

from ..distributed import gathered

# Per-micro-batch sums kept in TRL's metric store (so they are cleared with it) and reduced by `log`, which would
# otherwise average them: a mean of means is not token-weighted, a mean of maxima is not a maximum.
_SUMS = ("rollout/_abs_sum", "rollout/_signed_sum", "rollout/_tokens", "rollout/_abs_max")


class SampledLogprobs(LogitsProcessor):
    """Records ``log_softmax(logits / T)`` of each sampled token while `generate` runs.

    Custom processors run before transformers' sampling warpers (temperature, top-k, top-p), so the scores seen here
    are the model's logits (after any repetition penalty). One step's distribution is kept until the next step's
    ``input_ids`` reveal the token sampled from it.
    """

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature or 1.0
        self.steps: list[torch.Tensor] = []
        self.prompt_length: int | None = None
        self.sequences: torch.Tensor | None = None
        self._pending: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        self._finish_step(input_ids[:, -1])
        self._pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _finish_step(self, sampled: torch.Tensor) -> None:
        if self._pending is not None:
            self.steps.append(self._pending.gather(-1, sampled[:, None]).squeeze(-1))
            self._pending = None

    def per_completion(self, lengths: list[int]) -> list[torch.Tensor] | None:
        """Per completion (of these lengths, as TRL cut them: up to the first EOS), its tokens' log-probabilities."""
        if self.sequences is None or self.prompt_length is None:
            return None
        position = self.prompt_length + len(self.steps)
        if self._pending is not None and self.sequences.shape[1] > position:
            self._finish_step(self.sequences[:, position].to(self._pending.device))
        if not self.steps:
            return None
        logprobs = torch.stack(self.steps, dim=1).cpu()
        return [logprobs[i, :n] for i, n in enumerate(lengths)]


@contextlib.contextmanager
def _instance_attributes(obj, **values) -> Iterator[None]:
    """Set attributes on the instance for the duration of the block; restore (or remove) them afterwards."""
    own = vars(obj)
    saved = {name: (name in own, own.get(name)) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, (had, original) in saved.items():
            if had:
                setattr(obj, name, original)
            else:
                delattr(obj, name)  # the class attribute (a method) is visible again


def recording_generate(model, recorder: SampledLogprobs):
    """While the block runs, ``model.generate`` (the instance's, as TRL calls it) runs ``recorder`` among its logits
    processors and keeps the generated sequences for it."""
    original = model.generate  # FSDP2 registers its own `generate` on the instance to unshard around it

    def generate(*args, **kwargs):
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(recorder)
        sequences = original(*args, logits_processor=processors, **kwargs)
        recorder.sequences = sequences
        return sequences

    return _instance_attributes(model, generate=generate)


class VLLMLogprobs:
    """Records the sampled tokens' log-probabilities that TRL's `VLLMGeneration.generate` returns when asked for them
    (`logprobs=0`: the sampled token only), and which TRL's distillation trainer discards."""

    def __init__(self):
        self.logprobs: list | None = None

    def per_completion(self, lengths: list[int]) -> list[torch.Tensor] | None:
        if self.logprobs is None:
            return None
        return [torch.tensor([float("nan") if step[0] is None else step[0] for step in lp[:n]], dtype=torch.float32)
                for lp, n in zip(self.logprobs, lengths, strict=True)]


def recording_vllm(vllm_generation, recorder: VLLMLogprobs):
    """While the block runs, TRL's ``vllm_generation`` asks vLLM for the sampled tokens' log-probabilities
    (`logprobs=0`) and hands them to ``recorder``."""
    original = vllm_generation.generate

    def generate(*args, **kwargs):
        prompt_ids, completion_ids, logprobs, logprob_token_ids = original(*args, **kwargs)
        recorder.logprobs = logprobs
        return prompt_ids, completion_ids, logprobs, logprob_token_ids

    return _instance_attributes(vllm_generation, generate=generate, logprobs=0)


def logit_transform(config) -> tuple[float, float | None]:
    """``(scale, softcap)`` that TRL's divergence applies to a model's logits before the temperature.

    The scale is the config's `logit_scale`, else `output_multiplier`, else `lm_head_multiplier`, else
    `1 / logits_scaling` (HyperCLOVA X multiplies by it), else 1; the softcap is `final_logit_softcapping`.
    (`tests/trainer/test_trl_contract.py` checks that TRL still reads exactly these attributes.)
    """
    config = config.get_text_config()
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(config, name, None)
    scaling = getattr(config, "logits_scaling", None)
    if scale is None and scaling is not None:
        scale = scaling if config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else scale), getattr(config, "final_logit_softcapping", None)


@torch.no_grad()
def sampled_token_logprobs(hidden: torch.Tensor, head: torch.nn.Module, config, tokens: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """Log-probabilities of ``tokens`` (N,) after hidden states (N, H), projected as TRL's divergence projects them:
    the head in the compute dtype, logits in float32, scale, softcap, temperature. Chunked over tokens, so at most
    ~64 MiB of logits exist at a time."""
    scale, softcap = logit_transform(config)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    out = torch.empty(tokens.shape, dtype=torch.float32, device=hidden.device)
    with gathered([head.weight] + ([head.bias] if head.bias is not None else [])) as full:
        weight = full[0].to(dtype).float()
        bias = full[1].float() if len(full) > 1 else None
        step = max(1, 2**24 // weight.shape[0])
        for start in range(0, tokens.numel(), step):
            logits = hidden[start:start + step].to(dtype).float() @ weight.t()
            if bias is not None:
                logits += bias
            logits = logits * scale
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            logits = logits / temperature
            picked = logits.gather(-1, tokens[start:start + step, None]).squeeze(-1)
            out[start:start + step] = picked - torch.logsumexp(logits, dim=-1)
    return out


class RolloutCheckMixin:
    """Mixed in before `DistillationTrainer` (see the module docstring); `args.log_rollout_mismatch` switches it. It
    reads the micro-batch through `ScoringMixin.scored_batch`."""

    def _recording(self) -> bool:
        return bool(getattr(self.args, "log_rollout_mismatch", True)) and not self.tools

    def _generation_context(self):
        """Entered around generation (a sparse-delta trainer merges where merging is exact)."""
        return contextlib.nullcontext()

    # generation -----------------------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        recording = self._recording() and self.model.training  # evaluation batches are not trained on
        if self.use_vllm:
            recorder = VLLMLogprobs()
            record = recording_vllm(self.vllm_generation, recorder) if recording else contextlib.nullcontext()
        else:
            recorder = SampledLogprobs(self.temperature)
            unwrapped = self.accelerator.unwrap_model(self.model)
            record = recording_generate(unwrapped, recorder) if recording else contextlib.nullcontext()
        generating_here = contextlib.nullcontext() if self.use_vllm else self._generation_context()
        with generating_here, record:
            output = super()._generate_and_score_completions(inputs)
        if recording:
            # Every rank attaches the field (NaN where nothing was recorded), so every rank measures: the measurement
            # may gather the output head, a collective.
            completion_ids = output["completion_ids"]
            lengths = output["completion_mask"].sum(dim=1).tolist()
            logprobs = recorder.per_completion(lengths) or [torch.full((n,), float("nan")) for n in lengths]
            padded = pad([lp.float() for lp in logprobs], padding_value=float("nan"), padding_side="right")
            rollout = torch.full(completion_ids.shape, float("nan"))
            width = min(padded.shape[1], rollout.shape[1])
            rollout[:, :width] = padded[:, :width]
            output["rollout_logprobs"] = rollout.to(completion_ids.device)
        return output

    # measurement ----------------------------------------------------------------------------------------------------
    def _get_last_hidden_state(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs):
        hidden = super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)
        batch = self.scored_batch
        if (batch is not None and "rollout_logprobs" in batch
                and unwrapped_model is not self.accelerator.unwrap_model(self.teacher_model)):
            self._measure_rollout(unwrapped_model, hidden.detach(), input_ids[:, -logits_to_keep:],
                                  attention_mask[:, -logits_to_keep:], batch["rollout_logprobs"])
        return hidden

    def _measure_rollout(self, student, hidden, tokens, mask, rollout) -> None:
        head = student.get_output_embeddings()
        width = min(tokens.shape[1], rollout.shape[1])
        rollout = rollout[:, :width].to(hidden.device)
        valid = mask[:, :width].bool().to(hidden.device) & torch.isfinite(rollout)
        train = sampled_token_logprobs(hidden[:, :width][valid].to(head.weight.device), head, student.config,
                                       tokens[:, :width][valid].to(head.weight.device), self.temperature)
        diff = rollout[valid].to(train.device) - train
        metrics = self._metrics["train"]
        metrics[_SUMS[0]].append(float(diff.abs().sum()))
        metrics[_SUMS[1]].append(float(diff.sum()))
        metrics[_SUMS[2]].append(float(diff.numel()))
        metrics[_SUMS[3]].append(float(diff.abs().max()) if diff.numel() else 0.0)

    # logging --------------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not self.model.training:  # an evaluation's log: TRL reads the "eval" metrics, ours stay for training's
            return super().log(logs, start_time)
        sums = [self._metrics["train"].pop(key, []) for key in _SUMS]
        if self._recording() and "loss" in logs:  # a training log (not the summary after training)
            local = torch.tensor([sum(sums[0]), sum(sums[1]), sum(sums[2]), max(sums[3], default=0.0)],
                                 dtype=torch.float64, device=self.accelerator.device)
            every = self.accelerator.gather(local[None]).reshape(-1, 4)  # every rank logs: a collective
            tokens = float(every[:, 2].sum())
            if tokens > 0:
                logs["rollout/logp_abs_diff"] = float(every[:, 0].sum()) / tokens
                logs["rollout/logp_diff"] = float(every[:, 1].sum()) / tokens
                logs["rollout/logp_abs_diff_max"] = float(every[:, 3].max())
        super().log(logs, start_time)
