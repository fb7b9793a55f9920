"""The AdamW probe: per-coordinate statistics of a few full-parameter steps of any `transformers.Trainer`, and the
`mask_strategy="probe"` that runs it (full fine-tuning memory; one process or DDP).

Add `ProbeCallback` to a Trainer (SFT, GRPO, distillation, `SparseOPDTrainer` in dense mode, ...), train a few steps,
then keep the top coordinates under a budget with `to_mask`. Statistics, accumulated per targeted weight:

- ``"update"`` (default): ``|W_now - W_start|``, the cumulative update. It is the quantity a diff mask thresholds,
  so a probe of N steps is a short-horizon estimate of the full run's diff mask.
- ``"grad"``: ``sum_steps |g|`` (read just before each optimizer step, after clipping).
- ``"adam"``: ``sum_steps |m / (sqrt(v) + eps)|`` from AdamW's state just after each step: the normalized step
  direction, insensitive to the gradient scale of each coordinate.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping

import torch
from torch import nn
from transformers import TrainerCallback

from ..masks.sparse_mask import SparseMask
from ..masks.targets import linear_modules, stored_weight
from ..masks.top_k import top_k_mask

STATISTICS = ("update", "grad", "adam")


def _linear_weights(model: nn.Module, target_modules) -> dict[str, nn.Parameter]:
    return {name: stored_weight(module) for name, module in linear_modules(model, target_modules).items()}


class ProbeCallback(TrainerCallback):
    """Accumulates a per-coordinate statistic of the targeted weights during training; see the module docstring."""

    def __init__(self, statistic: str = "update", target_modules=None):
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        self.statistic = statistic
        self.target_modules = target_modules
        self.weights: dict[str, nn.Parameter] = {}
        self.scores: dict[str, torch.Tensor] = {}
        self._start: dict[str, torch.Tensor] = {}
        self._optimizer = None
        self.steps = 0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.weights = _linear_weights(model, self.target_modules)
        frozen = [n for n, w in self.weights.items() if not w.requires_grad]
        if frozen:
            raise ValueError(
                f"the probe needs full-parameter training of the weights it scores, but {frozen[:3]} are frozen "
                "(a PEFT model?); run the probe on the plain model"
            )
        self._optimizer = optimizer
        if self.statistic == "update":
            self._start = {n: w.detach().float().clone() for n, w in self.weights.items()}
        else:
            self.scores = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in self.weights.items()}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.statistic == "grad":
            for name, weight in self.weights.items():
                if weight.grad is not None:
                    self.scores[name].add_(weight.grad.detach().float().abs())

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.steps += 1
        if self.statistic != "adam":
            return
        optimizer = optimizer or self._optimizer
        states = getattr(optimizer, "state", None)
        if states is None:  # accelerate wraps the optimizer
            states = optimizer.optimizer.state
        eps = args.adam_epsilon
        for name, weight in self.weights.items():
            st = states.get(weight)
            if not st or "exp_avg" not in st:
                raise ValueError("statistic='adam' needs an Adam-type optimizer (exp_avg / exp_avg_sq in its state)")
            self.scores[name].add_((st["exp_avg"].float() / (st["exp_avg_sq"].float().sqrt() + eps)).abs())

    def current_scores(self) -> dict[str, torch.Tensor]:
        if self.statistic == "update":
            if not self._start:
                raise RuntimeError("the probe has not seen training start; add it to a Trainer and call train()")
            return {n: (w.detach().float() - self._start[n]).abs() for n, w in self.weights.items()}
        if not self.scores:
            raise RuntimeError("the probe has not seen training start; add it to a Trainer and call train()")
        return self.scores

    def to_mask(self, density: float | None = None, total: int | None = None,
                block_weights: str | Mapping[str, float] | None = "ffn") -> SparseMask:
        """The top-scoring coordinates per module under an exact budget (ties broken by position)."""
        scores = self.current_scores()
        return top_k_mask(scores, density=density, total=total, block_weights=block_weights)


def probe_mask(model, teacher_model, args, train_dataset, processing_class) -> SparseMask:
    """Run `mask_probe_steps` dense OPD steps with a `ProbeCallback`, take its mask, restore the weights exactly.

    The dense steps run on float32 weights, whatever the model's dtype: a bf16 weight cannot hold a step of a
    full-fine-tuning learning rate except near zero, so a bf16 probe would only rediscover the near-zero prior. The
    model's own tensors (dtype and bits) are put back afterwards.
    """
    from .mask_strategies import check_strategy
    from .opd_trainer import OPDTrainer
    from .progress import PhaseProgress

    check_strategy(args, train_dataset)
    # float32 tensors are trained in place, so they are copied; the others are replaced by `.float()` copies
    saved = {name: tensor.data.clone() if tensor.dtype == torch.float32 else tensor.data
             for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    model.float()
    probe = ProbeCallback(statistic=args.mask_probe_statistic, target_modules=args.mask_target_modules)
    try:
        with tempfile.TemporaryDirectory(prefix="sparse-opd-probe-") as tmp:
            progress = [] if args.disable_tqdm else [PhaseProgress("discovery")]
            trainer = OPDTrainer(
                model=model,
                teacher_model=teacher_model,
                args=_probe_args(args, tmp),
                train_dataset=train_dataset,
                processing_class=processing_class,
                callbacks=[probe, *progress],
            )
            PhaseProgress.replace_default(trainer)  # the probe's own log lines are not the user's
            trainer.train()
        return probe.to_mask(density=args.mask_density, block_weights=args.mask_block_weights)
    finally:
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            tensor.data = saved[name]
            if isinstance(tensor, torch.nn.Parameter):
                tensor.grad = None


def _probe_args(args, output_dir: str):
    probe_args = copy.deepcopy(args)
    for key, value in {
        "output_dir": output_dir,
        "max_steps": args.mask_probe_steps,
        "learning_rate": args.mask_probe_learning_rate,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": [],
        "push_to_hub": False,
        "logging_steps": args.mask_probe_steps,
        "mask_strategy": None,
        "log_weight_stats": False,
        "log_rollout_mismatch": False,
    }.items():
        setattr(probe_args, key, value)
    return probe_args
