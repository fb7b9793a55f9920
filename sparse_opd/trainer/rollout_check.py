"""On-policy, measured: the log-probability of every sampled token under the generation path against the training
forward, logged every step.

Rollouts must come from the policy being trained. The generation path and the training forward compute the same
function with different kernels (a token at a time with a KV cache, or vLLM with its own weights and kernels), so
they agree only to rounding. `RolloutCheckMixin` records, for every sampled completion token, ``log p_gen`` (the
sampling distribution at temperature ``T``, before top-k / top-p truncation) and, in the loss, ``log p_train`` from
the student's training-forward hidden states projected exactly as TRL's divergence projects them. It logs
``rollout/logp_abs_diff`` (mean over tokens), ``rollout/logp_abs_diff_max`` and ``rollout/logp_diff`` (mean signed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList
from trl.trainer.utils import pad


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

    def per_completion(self, completion_ids: list[list[int]]) -> list[torch.Tensor] | None:
        """Per completion (as TRL cut it: up to its first EOS), the log-probabilities of its tokens."""
        if self.sequences is None or self.prompt_length is None:
            return None
        position = self.prompt_length + len(self.steps)
        if self._pending is not None and self.sequences.shape[1] > position:
            self._finish_step(self.sequences[:, position].to(self._pending.device))
        if not self.steps:
            return None
        logprobs = torch.stack(self.steps, dim=1).cpu()
        return [logprobs[i, : len(ids)] for i, ids in enumerate(completion_ids)]


@contextlib.contextmanager
def recording_generate(model, recorder: SampledLogprobs) -> Iterator[None]:
    """Make ``model.generate`` (the instance's, as TRL calls it) run ``recorder`` among its logits processors and keep
    the generated sequences for it."""
    original = model.generate
    had_own = "generate" in vars(model)  # FSDP2 registers `generate` on the instance to unshard around it

    def generate(*args, **kwargs):
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(recorder)
        sequences = original(*args, logits_processor=processors, **kwargs)
        recorder.sequences = sequences
        return sequences

    model.generate = generate
    try:
        yield
    finally:
        if had_own:
            model.generate = original
        else:
            del model.generate  # the class method is visible again


def _projected_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias, scale: float, softcap, temperature: float,
                        tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``tokens`` from the student's hidden states, projected as TRL's divergence does."""
    if isinstance(weight, torch.distributed.tensor.DTensor):
        weight = weight.full_tensor().to(hidden.dtype)
        bias = bias.full_tensor() if bias is not None else None
    logits = F.linear(hidden, weight, bias).float() * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


class RolloutCheckMixin:
    """Mixed in before `DistillationTrainer` (see the module docstring); `args.log_rollout_mismatch` switches it."""

    def _recording(self) -> bool:
        return bool(getattr(self.args, "log_rollout_mismatch", True)) and not self.tools

    def _generation_context(self):
        """Entered around HF generation (a sparse-delta trainer merges where merging is exact)."""
        return contextlib.nullcontext()

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if self.use_vllm:
            return self._generate_single_turn_vllm(prompt_ids, images)
        if not self._recording():
            with self._generation_context():
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        recorder = SampledLogprobs(self.temperature)
        with self._generation_context(), recording_generate(self.accelerator.unwrap_model(self.model), recorder):
            completion_ids = super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        self._rollout_logprobs = recorder.per_completion(completion_ids)
        return completion_ids

    def _generate_single_turn_vllm(self, prompt_ids, images):
        """TRL's vLLM branch, keeping the sampled tokens' log-probabilities that TRL discards."""
        from trl.extras.profiling import profiling_context

        if self.state.global_step != self._last_loaded_step:
            with profiling_context(self, "sync_weights"):
                self.vllm_generation.sync_weights()
            self._last_loaded_step = self.state.global_step
        _, completion_ids, logprobs, _ = self.vllm_generation.generate(
            prompts=prompt_ids, images=images, num_generations=1, profiler=profiling_context(self, "vLLM.generate")
        )
        if self._recording() and logprobs is not None:
            self._rollout_logprobs = [torch.tensor([step[0] for step in lp], dtype=torch.float32) for lp in logprobs]
        return completion_ids

    def _generate_and_score_completions(self, inputs):
        self._rollout_logprobs = None
        output = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return output  # evaluation batches are not trained on
        logprobs = getattr(self, "_rollout_logprobs", None)
        if logprobs is not None and len(logprobs) == output["completion_ids"].shape[0]:
            padded = pad([lp.float() for lp in logprobs], padding_value=0.0, padding_side="right",
                         pad_to_multiple_of=self.pad_to_multiple_of)
            width = output["completion_ids"].shape[1]
            output["rollout_logprobs"] = padded[:, :width].to(output["completion_ids"].device)
        return output

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        rollout = inputs.get("rollout_logprobs")
        if rollout is None:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        import trl.trainer.distillation_trainer as distillation

        original = distillation._chunked_divergence_loss

        def measured(student_hidden, teacher_hidden, student_weight, teacher_weight, mask, beta, **kwargs):
            with torch.no_grad():
                train = _projected_logprobs(
                    student_hidden.detach(), student_weight, kwargs.get("student_lm_head_bias"),
                    kwargs.get("student_logit_scale", 1.0), kwargs.get("student_final_logit_softcapping"),
                    kwargs.get("temperature", 1.0), inputs["completion_ids"],
                )
                self._log_mismatch(train, rollout.to(train.device), mask.bool())
            return original(student_hidden, teacher_hidden, student_weight, teacher_weight, mask, beta, **kwargs)

        distillation._chunked_divergence_loss = measured
        try:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        finally:
            distillation._chunked_divergence_loss = original

    def _log_mismatch(self, train: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> None:
        width = min(train.shape[1], rollout.shape[1])
        mask = mask[:, :width]
        diff = (rollout[:, :width] - train[:, :width])[mask]
        stats = torch.stack([diff.abs().sum(), diff.sum(), diff.abs().max() if diff.numel() else diff.new_zeros(()),
                             diff.new_tensor(float(diff.numel()))])
        stats = self.accelerator.gather(stats[None]).reshape(-1, 4)
        count = stats[:, 3].sum().clamp(min=1)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["rollout/logp_abs_diff"].append((stats[:, 0].sum() / count).item())
        self._metrics[mode]["rollout/logp_diff"].append((stats[:, 1].sum() / count).item())
        self._metrics[mode]["rollout/logp_abs_diff_max"].append(stats[:, 2].max().item())
