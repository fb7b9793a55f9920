"""`SparseOPDTrainer`: TRL's on-policy distillation, training a sparse delta, with context distillation and telemetry.

What it changes in `trl.DistillationTrainer`, and where:
- `__init__`: turns a mask strategy from the config into a `SparseDeltaConfig` (or accepts a sparse-delta
  `PeftModel` / `peft_config`), and, without a teacher model, makes the student's own base weights the teacher.
- `_generate_and_score_completions`: adds the teacher's privileged prompt ids to the batch.
- `_compute_loss` / `_get_last_hidden_state`: the teacher scores the same completion tokens after its own prompt,
  and the base-weights teacher runs the student with the adapter disabled.
- `_generate_single_turn`: generates with the delta merged (exactly unmerged after), several times faster on a CPU.
- `log`: adds the weight-space telemetry; `create_model_card`: adds loading and training notes to TRL's card.
Generation, the generalized JSD loss, gradient accumulation, checkpoints, resume, hub pushes and distributed training
are `DistillationTrainer`'s own.
"""

from __future__ import annotations

import copy
import os
import tempfile

import torch
from accelerate.utils import is_peft_model
from peft import PeftConfig
from trl import DistillationTrainer
from trl.trainer.utils import create_model_from_path, pad

from ..masks import ProbeCallback, SparseMask, near_zero_mask, random_mask
from ..tuner import SparseDeltaConfig, SparseDeltaLayer
from ..tuner.model_card import add_loading_section
from .config import SparseOPDConfig, template_fields
from .generation import merged_sparse_delta
from .teachers import BaseWeightsTeacher, build_teacher_prompt
from .telemetry import UpdateNormCallback, sparse_delta_stats
from .vllm_sync import install_vllm_sync

_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def is_sparse_delta_model(model) -> bool:
    """Whether `model` is a `PeftModel` with at least one sparse-delta layer."""
    return is_peft_model(model) and any(isinstance(m, SparseDeltaLayer) for m in model.modules())


class PrivilegedTeacherMixin:
    """Lets a `DistillationTrainer`'s teacher score the student's completions after its own (privileged) prompt.

    Mixed in before `DistillationTrainer`. The teacher prompt of each row comes from `args.teacher_prompt_column`
    or `args.teacher_prompt_template` (see `SparseOPDConfig`); a `BaseWeightsTeacher` runs the student with its
    adapter disabled.
    """

    # data -----------------------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = []
        if self.args.teacher_prompt_column is not None:
            extra.append(self.args.teacher_prompt_column)
        if self.args.teacher_prompt_template is not None:
            extra += sorted(template_fields(self.args.teacher_prompt_template) - {"prompt"})
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *extra]))

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        teacher_prompts = [
            build_teacher_prompt(x, self.args.teacher_prompt_column, self.args.teacher_prompt_template) for x in inputs
        ]
        given = [p is not None for p in teacher_prompts]
        if not any(given):
            if isinstance(self.teacher_model, BaseWeightsTeacher):
                raise ValueError(
                    "the teacher is the student's base weights but this batch has no privileged context: every row "
                    f"needs a {self.args.teacher_prompt_column!r} value (or set teacher_prompt_template)"
                )
            return output
        if not all(given):
            raise ValueError(
                f"some rows have a teacher prompt and some do not ({sum(given)}/{len(given)} in this batch); give "
                f"every row a {self.args.teacher_prompt_column!r} value"
            )
        if any(key in output for key in _MULTIMODAL_KEYS):
            raise ValueError("a privileged teacher prompt is not supported with multimodal inputs")
        device = self.accelerator.device
        ids, _, _ = self._tokenize_prompts(teacher_prompts)
        ids = [torch.tensor(x) for x in ids]
        output["teacher_prompt_ids"] = pad(
            ids,
            padding_value=self._tokenizer.pad_token_id,
            padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)
        output["teacher_prompt_mask"] = pad(
            [torch.ones_like(x) for x in ids],
            padding_value=0,
            padding_side="left",
            pad_to_multiple_of=self.pad_to_multiple_of,
        ).to(device)
        return output

    # loss -----------------------------------------------------------------------------------------------------------
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        # The teacher's forward happens inside the parent's `_compute_loss`; it reads its prompt from here.
        self._teacher_batch = inputs
        try:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        finally:
            self._teacher_batch = None

    def _get_last_hidden_state(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs):
        if unwrapped_model is not self.accelerator.unwrap_model(self.teacher_model):
            return super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)
        batch = getattr(self, "_teacher_batch", None)
        if batch is not None and "teacher_prompt_ids" in batch:
            # Same completion tokens, right-padded alike, so the last `logits_to_keep` positions line up with the
            # student's; only the prompt in front of them differs.
            input_ids = torch.cat([batch["teacher_prompt_ids"], batch["completion_ids"]], dim=1)
            attention_mask = torch.cat([batch["teacher_prompt_mask"], batch["completion_mask"]], dim=1)
        if isinstance(unwrapped_model, BaseWeightsTeacher):
            student = unwrapped_model.student
            with student.disable_adapter():
                return super()._get_last_hidden_state(student, input_ids, attention_mask, logits_to_keep, **kwargs)
        return super()._get_last_hidden_state(unwrapped_model, input_ids, attention_mask, logits_to_keep, **kwargs)


class SparseOPDTrainer(PrivilegedTeacherMixin, DistillationTrainer):
    """On-policy distillation into a sparse delta: the student trains values on fixed coordinates of frozen weights.

    Args:
        model: the student. A sparse-delta `PeftModel`; or a model (id, path or `PreTrainedModel`) with a
            `SparseDeltaConfig` as `peft_config`; or a model with `args.mask_strategy` set, from which the trainer
            builds the mask and the adapter itself.
        teacher_model: a separate teacher (same vocabulary), as an id, path or `PreTrainedModel`, or
            `args.teacher_model_name_or_path`. If neither is given, the teacher is the student's own base weights
            (adapter disabled) in a privileged context: the `args.teacher_prompt_column` column or
            `args.teacher_prompt_template` (on-policy context distillation).
        args: a `SparseOPDConfig`.
        train_dataset / eval_dataset: datasets with a `prompt` column (conversational or text) and, for context
            distillation, the teacher prompt column (or the columns the template uses).
        Other arguments are `DistillationTrainer`'s.

    Every teacher that has a privileged prompt scores the completion tokens sampled by the student after that
    prompt; the student scores them after its own prompt; the generalized JSD compares the two on those tokens.
    """

    _tag_names = ["trl", "distillation", "sparse-opd", "sparse-delta"]
    _name = "SparseOPD"

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
        if args is None:
            args = SparseOPDConfig(output_dir="sparse-opd-output")
        elif not isinstance(args, SparseOPDConfig):
            raise TypeError(
                f"args must be a SparseOPDConfig, got {type(args).__name__}; build one with "
                "SparseOPDConfig(**your_config.to_dict()) or pass the same fields to SparseOPDConfig"
            )
        if teacher_model is None and args.teacher_model_name_or_path is not None:
            teacher_model = args.teacher_model_name_or_path
        self._check_teacher_context(args, teacher_model, train_dataset if train_dataset is not None else eval_dataset)

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
                f"{type(peft_config).__name__}; use trl.DistillationTrainer for other PEFT methods"
            )
        if not already_sparse and peft_config is None:
            if args.mask_strategy is None:
                raise ValueError(
                    "SparseOPDTrainer needs the coordinates to train: pass a sparse-delta PeftModel, a "
                    "SparseDeltaConfig as peft_config, or set args.mask_strategy ('file', 'diff', 'probe', "
                    "'near_zero' or 'random')"
                )
            if args.mask_strategy in ("probe", "near_zero", "random") and isinstance(model, str):
                model = self._load_student(model, args, quantization_config)
            peft_config = self._peft_config_from_strategy(model, teacher_model, args, train_dataset, processing_class)

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
        if not is_sparse_delta_model(self.model):
            raise ValueError("the student has no sparse-delta layer after setup; check the mask / peft_config")
        self.adapter_name = self.model.active_adapter
        if self.teacher_model is None:
            # Not prepared by the accelerator: it has no parameters of its own and runs the (prepared) student.
            self.teacher_model = BaseWeightsTeacher(self.model)
        if self.use_vllm:
            install_vllm_sync(self.vllm_generation, self.model)
        self._update_norms = UpdateNormCallback(self.adapter_name)
        if args.log_weight_stats:
            self.add_callback(self._update_norms)

    # setup ----------------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_teacher_context(args, teacher_model, dataset) -> None:
        if isinstance(dataset, dict):  # several eval sets: check the first
            dataset = next(iter(dataset.values()), None)
        has_context = args.teacher_prompt_template is not None
        columns = getattr(dataset, "column_names", None)
        if columns is not None:
            has_context = has_context or (
                args.teacher_prompt_column is not None and args.teacher_prompt_column in columns
            )
            if args.teacher_prompt_template is not None:
                missing = template_fields(args.teacher_prompt_template) - {"prompt"} - set(columns)
                if missing:
                    raise ValueError(
                        f"teacher_prompt_template uses {sorted(missing)}, which the dataset lacks (columns: "
                        f"{columns}); add the column(s) or change the template"
                    )
        elif dataset is not None:  # iterable dataset without known columns: trust the first row at run time
            has_context = has_context or args.teacher_prompt_column is not None
        if teacher_model is None and not has_context:
            raise ValueError(
                "no teacher: pass teacher_model (or args.teacher_model_name_or_path), or give the student's own base "
                f"weights a privileged context: a {args.teacher_prompt_column!r} column in the dataset "
                "(args.teacher_prompt_column) or args.teacher_prompt_template. Without one the teacher would be the "
                "student itself."
            )

    @staticmethod
    def _load_student(model_id: str, args: SparseOPDConfig, quantization_config):
        kwargs = dict(args.model_init_kwargs or {})
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            kwargs["device_map"] = None
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        return create_model_from_path(model_id, **kwargs)

    @classmethod
    def _peft_config_from_strategy(cls, model, teacher_model, args, train_dataset, processing_class):
        strategy = args.mask_strategy
        target = args.mask_target_modules
        if strategy == "file":
            return SparseDeltaConfig(mask=SparseMask.load(args.mask_path))
        if strategy == "near_zero":
            return SparseDeltaConfig(
                mask=near_zero_mask(
                    model, density=args.mask_density, block_weights=args.mask_block_weights, target_modules=target
                )
            )
        if strategy == "random":
            return SparseDeltaConfig(
                mask=random_mask(
                    model,
                    density=args.mask_density,
                    block_weights=args.mask_block_weights,
                    target_modules=target,
                    seed=args.mask_seed,
                )
            )
        if strategy == "diff":
            mask = SparseMask.from_diff(
                args.mask_diff_base, args.mask_diff_tuned, threshold=args.mask_diff_threshold, target_modules=target
            )
            if not mask.modules():
                raise ValueError(
                    f"{args.mask_diff_tuned} does not differ from {args.mask_diff_base} by more than "
                    f"{args.mask_diff_threshold} anywhere in the targeted modules; lower mask_diff_threshold or check "
                    "the checkpoints"
                )
            return SparseDeltaConfig(mask=mask)
        if strategy == "probe":
            return SparseDeltaConfig(mask=cls._probe_mask(model, teacher_model, args, train_dataset, processing_class))
        raise ValueError(f"unknown mask_strategy {strategy!r}")

    @classmethod
    def _probe_mask(cls, model, teacher_model, args, train_dataset, processing_class) -> SparseMask:
        """Run `mask_probe_steps` dense OPD steps with a `ProbeCallback`, take its mask, restore the weights."""
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        probe = ProbeCallback(statistic=args.mask_probe_statistic, target_modules=args.mask_target_modules)
        with tempfile.TemporaryDirectory(prefix="sparse-opd-probe-") as tmp:
            probe_args = copy.deepcopy(args)
            for key, value in {
                "output_dir": tmp,
                "max_steps": args.mask_probe_steps,
                "learning_rate": args.mask_probe_learning_rate,
                "save_strategy": "no",
                "eval_strategy": "no",
                "report_to": [],
                "push_to_hub": False,
                "logging_steps": args.mask_probe_steps,
                "mask_strategy": None,
                "log_weight_stats": False,
            }.items():
                setattr(probe_args, key, value)
            DenseOPDTrainer(
                model=model,
                teacher_model=teacher_model,
                args=probe_args,
                train_dataset=train_dataset,
                processing_class=processing_class,
                callbacks=[probe],
            ).train()
        mask = probe.to_mask(density=args.mask_density, block_weights=args.mask_block_weights)  # before restoring
        with torch.no_grad():
            model.load_state_dict(saved)
        for param in model.parameters():
            param.grad = None
        return mask

    # generation -----------------------------------------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        # Merged, the student generates at the base model's speed; unmerge restores the base weights bit for bit.
        if self.use_vllm or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        with merged_sparse_delta(self.model):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)

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

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's card, plus how to load a sparse-delta adapter and how this one was trained."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        config = self.model.peft_config[self.adapter_name]
        add_loading_section(self.args.output_dir, config)
        teacher = (
            f"the student's own base weights, shown the privileged `{self.args.teacher_prompt_column}` context"
            if isinstance(self.teacher_model, BaseWeightsTeacher)
            else f"`{getattr(self._teacher_unwrapped_config(), '_name_or_path', None) or 'a separate model'}`"
        )
        counts = config.module_counts or {}
        section = (
            "\n\n## Sparse on-policy distillation\n\n"
            f"- trained coordinates: {sum(counts.values()):,} in {len(counts)} weight matrices "
            f"(mask: {self.args.mask_strategy or 'given'}"
            + (
                f", density {self.args.mask_density}"
                if self.args.mask_strategy in ("probe", "near_zero", "random")
                else ""
            )
            + ")\n"
            f"- teacher: {teacher}\n"
            f"- divergence: generalized JSD with beta={self.args.beta} (0 = forward KL, 1 = reverse KL), "
            f"temperature {self.args.temperature}\n"
            f"- steps: {self.state.global_step}, learning rate {self.args.learning_rate}\n"
        )
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, "a", encoding="utf-8") as f:
            f.write(section)

    def _teacher_unwrapped_config(self):
        return getattr(self.accelerator.unwrap_model(self.teacher_model), "config", None)


class DenseOPDTrainer(PrivilegedTeacherMixin, DistillationTrainer):
    """On-policy distillation of every weight (or of a LoRA / other PEFT adapter) with `SparseOPDTrainer`'s teachers.

    The baseline sparse OPD is measured against, and the way to make the full-OPD checkpoint that
    `mask_strategy="diff"` reads; the `"probe"` strategy runs it for a few steps. It takes a `SparseOPDConfig`
    (the mask fields are ignored) and the same teachers: a teacher model, or, without one, the student's own starting
    weights in the privileged context (a frozen copy for a dense student; the adapter disabled for a PEFT student).
    """

    _tag_names = ["trl", "distillation", "sparse-opd"]
    _name = "DenseOPD"

    def __init__(self, model, teacher_model=None, args: SparseOPDConfig | None = None, train_dataset=None,
                 peft_config: PeftConfig | None = None, **kwargs):
        if args is None:
            args = SparseOPDConfig(output_dir="dense-opd-output")
        if teacher_model is None and args.teacher_model_name_or_path is not None:
            teacher_model = args.teacher_model_name_or_path
        SparseOPDTrainer._check_teacher_context(args, teacher_model, train_dataset)
        if teacher_model is None and peft_config is None and not is_peft_model(model):
            if isinstance(model, str):
                model = SparseOPDTrainer._load_student(model, args, kwargs.get("quantization_config"))
            teacher_model = copy.deepcopy(model).eval().requires_grad_(False)
        super().__init__(model=model, teacher_model=teacher_model, args=args, train_dataset=train_dataset,
                         peft_config=peft_config, **kwargs)
        if self.teacher_model is None:
            self.teacher_model = BaseWeightsTeacher(self.model)
