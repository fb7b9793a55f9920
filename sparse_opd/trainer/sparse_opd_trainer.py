"""`SparseOPDTrainer`: `OPDTrainer` training a sparse delta, with the weight-space telemetry and its own model card.

What it adds to `OPDTrainer` (whose overrides of `trl.DistillationTrainer` are listed in `opd_trainer.py`):
- `__init__`: turns a mask strategy from the config into a `SparseDeltaConfig` (or accepts a sparse-delta
  `PeftModel` / `peft_config`); with vLLM, installs the sparse weight sync (`vllm_sync.py`).
- `_generation_context`: generation samples exactly the trained policy (fp32 layers merged bit for bit, others
  through the layer's sparse path).
- `train`: with `mask_strategy="gradient"`, discovers the coordinates first (or adopts a checkpoint's).
- `log`: adds the weight-space telemetry; `create_model_card`: the adapter's own card (loading, training, results).
"""

from __future__ import annotations

import os
from typing import ClassVar

from peft import PeftConfig
from torch import nn

from ..tuner import SparseDeltaConfig, SparseDeltaLayer, adapter_mask, merged_sparse_delta
from .config import SparseOPDConfig
from .discovery import GradientDiscovery, adopt_checkpoint_mask
from .mask_strategies import check_strategy, peft_config_from_strategy
from .model_card import opd_model_card
from .opd_trainer import OPDTrainer
from .privileged import load_student
from .teachers import BaseWeightsTeacher
from .telemetry import UpdateNormCallback, sparse_delta_stats
from .vllm_sync import install_vllm_sync


def is_sparse_delta_model(model) -> bool:
    """Whether `model` is a `PeftModel` with at least one sparse-delta layer (`False` for a model id or path)."""
    from accelerate.utils import is_peft_model

    return isinstance(model, nn.Module) and is_peft_model(model) and any(
        isinstance(m, SparseDeltaLayer) for m in model.modules()
    )


def _student_and_adapter_config(model, teacher_model, args, train_dataset, processing_class, quantization_config,
                                peft_config):
    """The student (loaded when a prior or probe must read its weights) and the `SparseDeltaConfig` to apply, or
    `None` when the student already carries a sparse-delta adapter."""
    already_sparse = is_sparse_delta_model(model)
    if already_sparse and (peft_config is not None or args.mask_strategy is not None):
        raise ValueError(
            "the model already carries a sparse-delta adapter; drop peft_config / mask_strategy, or pass the base "
            "model instead"
        )
    if peft_config is not None and args.mask_strategy is not None:
        raise ValueError("give either peft_config or args.mask_strategy, not both")
    if peft_config is not None and not isinstance(peft_config, SparseDeltaConfig):
        raise TypeError(
            f"peft_config must be a SparseDeltaConfig (this trainer trains sparse deltas), got "
            f"{type(peft_config).__name__}; use sparse_opd.OPDTrainer or trl.DistillationTrainer for other PEFT "
            "methods"
        )
    if already_sparse or peft_config is not None:
        return model, peft_config
    if args.mask_strategy is None:
        raise ValueError(
            "SparseOPDTrainer needs the coordinates to train: pass a sparse-delta PeftModel, a SparseDeltaConfig as "
            "peft_config, or set args.mask_strategy ('gradient', 'file', 'diff', 'probe', 'near_zero' or 'random')"
        )
    check_strategy(args, train_dataset)
    if args.mask_strategy in ("gradient", "probe", "near_zero", "random") and isinstance(model, str):
        model = load_student(model, args, quantization_config)
    return model, peft_config_from_strategy(model, teacher_model, args, train_dataset, processing_class)


class SparseOPDTrainer(OPDTrainer):
    """On-policy distillation into a sparse delta: the student trains values on fixed coordinates of frozen weights.

    An [`OPDTrainer`] (TRL's [`~trl.DistillationTrainer`] with privileged-context teachers and on-policy checks) whose
    student is a sparse-delta `PeftModel`, built from the config's mask strategy when it is not given one. Rollouts are
    sampled from exactly the trained policy (fp32 layers merged bit for bit, others through the sparse path); with
    vLLM, the weight sync sends the merged weights composed out of place, and after the first sync only the adapted
    ones. Every logging step adds the weight-space telemetry (`sparse/...`).

    Args:
        model (`str`, [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The student: a sparse-delta `PeftModel`; or a model (id, path or `PreTrainedModel`) with a
            `SparseDeltaConfig` as `peft_config`; or a model with `args.mask_strategy` set, from which the trainer
            builds the mask and the adapter itself.
        teacher_model (`str` or [`~transformers.PreTrainedModel`], *optional*):
            A separate teacher (same vocabulary), or `args.teacher_model_name_or_path`. If neither is given, the
            teacher is the student's own base weights (adapter disabled) in a privileged context: the
            `args.teacher_prompt_column` column or `args.teacher_prompt_template` (on-policy context distillation).
        args ([`SparseOPDConfig`], *optional*):
            Configuration; `SparseOPDConfig(output_dir="sparse-opd-output")` if `None` (which then needs a sparse
            `PeftModel` or a `peft_config`).
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            A `prompt` column (conversational or text) and, for context distillation, the teacher prompt column (or
            the columns the template uses).
        peft_config ([`SparseDeltaConfig`], *optional*):
            The adapter to train, instead of `args.mask_strategy`.
        eval_dataset, processing_class, callbacks, optimizers, quantization_config, tools:
            As in [`~trl.DistillationTrainer`].

    Every teacher that has a privileged prompt scores the completion tokens sampled by the student after that
    prompt; the student scores them after its own prompt; the generalized JSD compares the two on those tokens.

    Example:

    ```python
    >>> from sparse_opd.tasks import arithmetic_dataset
    >>> from sparse_opd.trainer import SparseOPDConfig, SparseOPDTrainer

    >>> args = SparseOPDConfig(output_dir="out", mask_strategy="near_zero", mask_density=0.01, learning_rate=2e-3,
    ...                        max_completion_length=48, max_steps=24)
    >>> trainer = SparseOPDTrainer(model="HuggingFaceTB/SmolLM2-135M-Instruct", args=args,  # teacher: its base weights
    ...                            train_dataset=arithmetic_dataset("train", 2000, level=1))
    >>> trainer.train()
    >>> trainer.save_model()  # the adapter: adapter_model.safetensors + adapter_config.json
    ```
    """

    _tag_names: ClassVar[list[str]] = ["trl", "distillation", "sparse-opd", "sparse-delta"]
    _name = "SparseOPD"
    _config_class = SparseOPDConfig
    _default_output_dir = "sparse-opd-output"

    def __init__(
        self,
        model,
        teacher_model=None,
        args: SparseOPDConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config: PeftConfig | None = None,
        tools=None,
    ):
        super().__init__(
            model=model,
            teacher_model=teacher_model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
        )
        args = self.args
        if not is_sparse_delta_model(self.model):
            raise ValueError("the student has no sparse-delta layer after setup; check the mask / peft_config")
        self.adapter_name = self.model.active_adapter
        # what the card states beyond the trainer's own arguments: task, teacher, results ({label: EvalResult})
        self.model_card_details: dict = {}
        if self.use_vllm:
            install_vllm_sync(self.vllm_generation, self.model)
        self._update_norms = UpdateNormCallback(self.adapter_name)
        if args.log_weight_stats:
            self.add_callback(self._update_norms)
        if args.mask_save_path and args.mask_strategy not in (None, "gradient") and self.is_world_process_zero():
            adapter_mask(self.model, self.adapter_name).save(args.mask_save_path)  # "gradient": once discovered
        self.discovery = None
        if args.mask_strategy == "gradient":
            # first among the callbacks: its on_train_begin moves the adapter before anything reads it
            self.discovery = GradientDiscovery(self, args.mask_gradient_steps, args.mask_gradient_statistic)
            self.callback_handler.callbacks.insert(0, self.discovery)

    def _prepare_models(self, model, teacher_model, args, train_dataset, processing_class, quantization_config,
                        peft_config):
        """The student (loaded when a prior or probe reads its weights) and the `SparseDeltaConfig` that
        `DistillationTrainer` applies (see `_student_and_adapter_config`); the teacher as given."""
        model, peft_config = _student_and_adapter_config(
            model, teacher_model, args, train_dataset, processing_class, quantization_config, peft_config
        )
        return model, teacher_model, peft_config

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; with `mask_strategy="gradient"`, the coordinates are discovered first (or, when resuming,
        read from the checkpoint)."""
        if self.discovery is not None and not self.discovery.done and resume_from_checkpoint:
            adopt_checkpoint_mask(self, resume_from_checkpoint)
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                               ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        return output

    # generation -----------------------------------------------------------------------------------------------------
    def _generation_context(self):
        # fp32 layers generate merged (the same weights as the training forward, bit for bit; unmerge restores the
        # base exactly); bf16/fp16, quantized and sharded layers stay unmerged and use the layer's O(k) sparse path.
        return merged_sparse_delta(self.model)

    # logging --------------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.args.log_weight_stats and self.model.training and "loss" in logs:
            stats = sparse_delta_stats(self.model, self.adapter_name, tau=self.args.weight_stats_tau)
            for key in (
                "moved_frac",
                "moved_frac_tau",
                "bf16_visible_frac",
                "delta_norm_ffn",
                "delta_norm_attention",
                "delta_norm_other",
            ):
                logs[f"sparse/{key}"] = stats[key]
            norms = self._update_norms.norms
            if norms:
                logs["sparse/update_norm"] = sum(norms) / len(norms)
                norms.clear()
        super().log(logs, start_time)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        """Write the adapter's card to ``output_dir/README.md``: how to load it, the task, teacher, mask and steps
        it was trained with, and (when set in `model_card_details["results"]`) its scores before and after."""
        if not self.is_world_process_zero():
            return
        details = {"teacher": self._teacher_description(), **self.model_card_details}
        if dataset_name is not None:
            details.setdefault("task", dataset_name)
        name = model_name or (self.args.hub_model_id or os.path.basename(os.path.normpath(self.args.output_dir)))
        card = opd_model_card(self, name.split("/")[-1], tags=tags, **details)
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "README.md"), "w", encoding="utf-8") as f:
            f.write(card)

    def _teacher_description(self) -> str:
        if isinstance(self.teacher_model, BaseWeightsTeacher):
            return f"the student's own base weights, shown the privileged `{self.args.teacher_prompt_column}` context"
        name = getattr(self._teacher_unwrapped_config(), "_name_or_path", None) or "a separate model"
        seen = (f"the privileged `{self.args.teacher_prompt_column}` context" if self.args.teacher_privileged_context
                else "the student's prompt")
        return f"`{name}`, shown {seen}"

    def _teacher_unwrapped_config(self):
        return getattr(self.accelerator.unwrap_model(self.teacher_model), "config", None)


