"""How the training forward scores a micro-batch of rollouts: at the positions they were sampled at, with the
micro-batch in view of the hidden-state overrides.

Positions. `generate()` numbers a left-padded row from its first real token (`attention_mask.cumsum(-1) - 1`), so a
completion token sits at the same position whatever the batch. TRL's training forward passes no `position_ids`, so
the model numbers every column from 0, pads included: a row shorter than the longest prompt of its micro-batch is
scored as many positions later than it was sampled as it has pads. Models with absolute position embeddings (GPT-2,
OPT, ...) then compute another function of the same tokens; rotary models see the same relative offsets, rounded
differently. The teacher's privileged prompt is padded on its own, so its shift differs again. `ScoringMixin` gives
every backbone forward of the loss (student and teacher) the positions `generate()` uses.

The micro-batch. TRL's `_compute_loss` builds the student's and the teacher's inputs from the micro-batch, then calls
`_get_last_hidden_state` with token ids and masks only; TRL 1.16 offers no hook that passes the batch itself. The
overrides that need more of it (the teacher's own prompt, the rollout's log-probabilities) read `scored_batch`, which
is set for the duration of one `_compute_loss` call and `None` otherwise.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import nn


def generation_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """The positions `generate()` gives a left-padded batch: each row counts from its first real token (pads: 0)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def _backbone(model: nn.Module) -> nn.Module | None:
    """The module TRL's `_get_last_hidden_state` calls: the causal LM's `base_model`, under any PEFT wrapper."""
    from accelerate.utils import is_peft_model

    if is_peft_model(model):
        model = model.base_model.model
    return getattr(model, "base_model", None)


@contextlib.contextmanager
def positions_from_attention_mask(backbone: nn.Module) -> Iterator[None]:
    """While the block runs, a call of ``backbone`` with a 2-D `attention_mask` and no `position_ids` gets
    `generation_position_ids(attention_mask)` (a no-op for backbones that take no `position_ids`)."""
    if "position_ids" not in inspect.signature(backbone.forward).parameters:
        yield
        return

    def supply_positions(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if kwargs.get("position_ids") is None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            kwargs["position_ids"] = generation_position_ids(mask)
        return args, kwargs

    handle = backbone.register_forward_pre_hook(supply_positions, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class ScoringMixin:
    """Mixed in just before `DistillationTrainer`: rollouts scored at their generation positions (every text model;
    a vision-language model keeps its own position scheme), and `scored_batch` during `_compute_loss`."""

    scored_batch: dict | None = None

    @contextlib.contextmanager
    def scoring(self, inputs: dict) -> Iterator[None]:
        """Make ``inputs`` the `scored_batch` for the duration of the block (e.g. to call `_get_last_hidden_state`
        directly, as `_compute_loss` does)."""
        previous, self.scored_batch = self.scored_batch, inputs
        try:
            yield
        finally:
            self.scored_batch = previous

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        with self.scoring(inputs):
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

    def _get_last_hidden_state(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs):
        backbone = None if self._is_vlm else _backbone(unwrapped_model)
        with positions_from_attention_mask(backbone) if backbone is not None else contextlib.nullcontext():
            return super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)
