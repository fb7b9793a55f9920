"""The configs of the trainers: `OPDConfig` (`OPDTrainer`: TRL's `DistillationConfig` plus the teacher's context and
the on-policy checks) and `SparseOPDConfig` (`SparseOPDTrainer`: plus the trained coordinates and weight telemetry)."""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from trl import DistillationConfig

from ..masks.budget import parse_block_weights

MASK_STRATEGIES = ("gradient", "file", "diff", "probe", "near_zero", "random")
GRADIENT_STATISTICS = ("snr", "gain", "fisher", "mean")


@dataclass
class OPDConfig(DistillationConfig):
    r"""
    Configuration of [`OPDTrainer`]: every [`~trl.DistillationConfig`] field, plus the fields below.

    Parameters that control the teacher's context:

        teacher_prompt_column (`str` or `None`, *optional*, defaults to `"teacher_prompt"`):
            If the dataset has this column, the teacher scores each completion after this prompt instead of the
            student's prompt: on-policy context distillation (the column holds privileged information such as worked
            examples or the reference solution, which the student never sees). Same format as `prompt`
            (conversational or plain text). `None` ignores the column.
        teacher_prompt_template (`str`, *optional*):
            Builds the teacher prompt from each row when there is no teacher prompt column: a format string with
            `{prompt}` (the student's last user message, or the whole prompt for plain text) and any other column,
            e.g. `"Reference solution:\n{solution}\n\n{prompt}"`.
        teacher_privileged_context (`bool`, *optional*):
            Whether the teacher reads the privileged prompt. By default (`None`) only a teacher that is the student's
            own base weights does (on-policy context distillation); a separate teacher model reads the student's own
            prompt (standard on-policy distillation) unless this is `True`.

    With no teacher model (neither `teacher_model` nor `teacher_model_name_or_path`), the teacher is the student's own
    starting weights in the privileged context, which must then be given. Every teacher pass runs in eval mode (no
    dropout), whatever mode the student trains in.

    Parameters that keep the training on-policy:

        disable_dropout (`bool`, *optional*, defaults to `True`):
            Turn the student's dropout off (every `nn.Dropout` and every float `*dropout*` rate an attention layer
            keeps, such as Llama's `attention_dropout`). With dropout on, each generation step and the training
            forward draw different masks, so the completions are not sampled from the distribution the loss
            differentiates: the rollouts are off-policy by the dropout noise.
        log_rollout_mismatch (`bool`, *optional*, defaults to `True`):
            Log how far the log-probabilities of the sampled tokens under the generation path (transformers or vLLM)
            are from the training forward's, over each logging window: `rollout/logp_abs_diff` (mean over all sampled
            tokens of all ranks and micro-batches), `rollout/logp_abs_diff_max` (their maximum) and
            `rollout/logp_diff` (signed mean).

    > [!NOTE]
    > Default differing from [`~trl.DistillationConfig`]: `disable_dropout` is `True` instead of `False`.

    Example:

    ```python
    >>> from sparse_opd.trainer import OPDConfig

    >>> args = OPDConfig(output_dir="opd", teacher_prompt_template="Reference solution:\n{solution}\n\n{prompt}")
    ```
    """

    disable_dropout: bool = field(
        default=True,
        metadata={"help": "Turn the student's dropout off, so rollouts are sampled from the policy the loss trains."},
    )

    # Parameters that control the teacher's context
    teacher_prompt_column: str | None = field(
        default="teacher_prompt",
        metadata={
            "help": "Column with the teacher's privileged prompt (on-policy context distillation); used when the "
            "dataset has it."
        },
    )
    teacher_privileged_context: bool | None = field(
        default=None,
        metadata={
            "help": "Whether the teacher reads the privileged prompt. Default: only when the teacher is the student's "
            "own base weights; a separate teacher model reads the student's prompt unless this is True."
        },
    )
    teacher_prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "Format string building the teacher prompt from a row, with {prompt} and other columns, e.g. "
            "'Reference solution:\\n{solution}\\n\\n{prompt}'."
        },
    )

    # Parameters that keep the training on-policy
    log_rollout_mismatch: bool = field(
        default=True,
        metadata={"help": "Log |log p_generation - log p_training| of the sampled tokens (rollout/logp_abs_diff)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_prompt_template is not None:
            fields_ = template_fields(self.teacher_prompt_template)
            if "prompt" not in fields_:
                raise ValueError(
                    "teacher_prompt_template must contain {prompt} (the student's prompt), e.g. "
                    "'Reference solution:\\n{solution}\\n\\n{prompt}'"
                )


@dataclass
class SparseOPDConfig(OPDConfig):
    r"""
    Configuration of [`SparseOPDTrainer`]: every [`OPDConfig`] field (so every [`~trl.DistillationConfig`] field),
    plus the fields below.

    Parameters that choose the trained coordinates (used only when the trainer is given neither a sparse-delta
    `PeftModel` nor a `peft_config`):

        mask_strategy (`str`, *optional*):
            How to build the mask: `"gradient"` (statistics of the OPD gradient over the run's first
            `mask_gradient_steps` rollout batches, scored before any update: no optimizer state, no copy of the
            weights, sharded with the model; see `sparse_opd.trainer.discovery`), `"file"` (a mask saved with
            `SparseMask.save`, at `mask_path`), `"diff"` (the coordinates that changed between two checkpoints
            `mask_diff_base` and `mask_diff_tuned`, e.g. a full OPD run), `"probe"` (statistics of `mask_probe_steps`
            dense AdamW OPD steps run first: full fine-tuning memory, one process or DDP only), `"near_zero"` (the
            smallest-|W| coordinates, OPD's prior) or `"random"`. Measured on SmolLM2-135M (docs/masks.md): at 1%
            the probe picks the best coordinates, then `"near_zero"`; `"gradient"` was no better than `"random"`;
            at 5% (same rate) the probe's were the worst.
        mask_gradient_steps (`int`, *optional*, defaults to `8`): rollout batches (generation batches of
            `per_device_train_batch_size * gradient_accumulation_steps` prompts per process) scored by `"gradient"`.
        mask_gradient_statistic (`str`, *optional*, defaults to `"snr"`): what `"gradient"` ranks coordinates by:
            `"snr"` (|mean g| / (rms g + adam_epsilon), the size of AdamW's normalized step), `"gain"`
            (mean g^2 / (rms g + adam_epsilon), the loss decrease of that step), `"fisher"` (mean g^2)
            or `"mean"` (|mean g|); see `sparse_opd.masks.gradient_stats`.
        mask_path (`str`, *optional*): mask file for `mask_strategy="file"`.
        mask_diff_base (`str`, *optional*): base checkpoint (local dir or Hub id) for `"diff"`.
        mask_diff_tuned (`str`, *optional*): tuned checkpoint for `"diff"`.
        mask_diff_threshold (`float`, *optional*, defaults to `1e-5`): `|tuned - base|` above which a coordinate
            counts as changed, for `"diff"`.
        mask_density (`float`, *optional*, defaults to `0.01`): fraction of the targeted weight entries to train, for
            `"probe"`, `"near_zero"` and `"random"`.
        mask_block_weights (`str`, *optional*, defaults to `"ffn"`): how the budget splits between blocks: `"ffn"`
            (FFN-heavy, as OPD's own updates), `"uniform"` or a JSON object such as `'{"ffn": 2.0}'`.
        mask_target_modules (`list[str]`, *optional*): modules to consider (default: every linear layer but the
            output head).
        mask_probe_steps (`int`, *optional*, defaults to `8`): dense OPD steps of the `"probe"` strategy.
        mask_probe_learning_rate (`float`, *optional*, defaults to `1e-6`): learning rate of those dense steps (a
            full fine-tuning rate, unlike `learning_rate`, which is for the sparse values).
        mask_probe_statistic (`str`, *optional*, defaults to `"update"`): statistic the probe ranks coordinates by
            (see `sparse_opd.trainer.probe.ProbeCallback`).
        mask_seed (`int`, *optional*, defaults to `0`): seed of `"random"`.
        mask_save_path (`str`, *optional*): also write the mask the strategy built to this file (`SparseMask.save`),
            e.g. to reuse a probe's mask under FSDP / ZeRO-3 with `mask_strategy="file"`.

    Parameters that control the weight-space telemetry:

        log_weight_stats (`bool`, *optional*, defaults to `True`): log, every logging step, the fraction of masked
            values that moved (`sparse/moved_frac`), that moved by more than `weight_stats_tau`
            (`sparse/moved_frac_tau`), that survive a bf16 cast of the merged weight (`sparse/bf16_visible_frac`),
            the delta's L2 norm per block (`sparse/delta_norm_ffn`, `..._attention`, `..._other`) and the L2 norm of
            the last optimizer step's update of the values (`sparse/update_norm`, averaged over the logging window).
        weight_stats_tau (`float`, *optional*, defaults to `1e-5`): threshold of `sparse/moved_frac_tau`.

    > [!NOTE]
    > Default differing from [`OPDConfig`]: `learning_rate` is `1e-4` instead of `1e-6`. The trainable values are few
    > and start at zero; the full-fine-tuning rate moves them too little to matter within a short run.

    Example:

    ```python
    >>> from sparse_opd.trainer import SparseOPDConfig

    >>> args = SparseOPDConfig(output_dir="sparse-opd", mask_strategy="near_zero", mask_density=0.01,
    ...                        learning_rate=2e-3, max_completion_length=128)
    ```
    """

    learning_rate: float = field(
        default=1e-4,
        metadata={"help": "The initial learning rate for AdamW (on the sparse values)."},
    )

    # Parameters that choose the trained coordinates
    mask_strategy: str | None = field(
        default=None,
        metadata={
            "help": "How to build the mask when the model has no sparse-delta adapter: 'gradient', 'file', 'diff', "
            "'probe', 'near_zero' or 'random'."
        },
    )
    mask_path: str | None = field(default=None, metadata={"help": "Mask file for mask_strategy='file'."})
    mask_diff_base: str | None = field(default=None, metadata={"help": "Base checkpoint for mask_strategy='diff'."})
    mask_diff_tuned: str | None = field(default=None, metadata={"help": "Tuned checkpoint for mask_strategy='diff'."})
    mask_diff_threshold: float = field(
        default=1e-5, metadata={"help": "|tuned - base| above which a coordinate counts as changed ('diff')."}
    )
    mask_density: float = field(
        default=0.01,
        metadata={"help": "Fraction of targeted weight entries to train ('probe', 'near_zero', 'random')."},
    )
    mask_block_weights: str = field(
        default="ffn",
        metadata={"help": "Budget split between blocks: 'ffn' (FFN-heavy), 'uniform' or a JSON object like "
                          "'{\"ffn\": 2.0}'."},
    )
    mask_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to consider for the mask (default: all linear layers but the head)."}
    )
    mask_gradient_steps: int = field(
        default=8, metadata={"help": "Rollout batches scored by mask_strategy='gradient' before training."}
    )
    mask_gradient_statistic: str = field(
        default="snr", metadata={"help": "Statistic of mask_strategy='gradient': 'snr', 'gain', 'fisher' or 'mean'."}
    )
    mask_probe_steps: int = field(default=8, metadata={"help": "Dense OPD steps run by mask_strategy='probe'."})
    mask_probe_learning_rate: float = field(
        default=1e-6, metadata={"help": "Learning rate of the dense probe steps (full fine-tuning scale)."}
    )
    mask_probe_statistic: str = field(
        default="update", metadata={"help": "Statistic the probe ranks coordinates by (see ProbeCallback)."}
    )
    mask_seed: int = field(default=0, metadata={"help": "Seed of mask_strategy='random'."})
    mask_save_path: str | None = field(
        default=None,
        metadata={"help": "Also write the mask the strategy built to this file (e.g. a probe's, to reuse it)."},
    )

    # Parameters that control the weight-space telemetry
    log_weight_stats: bool = field(
        default=True, metadata={"help": "Log moved / bf16-visible fractions and delta / update norms."}
    )
    weight_stats_tau: float = field(default=1e-5, metadata={"help": "Threshold of sparse/moved_frac_tau."})

    def __post_init__(self):
        super().__post_init__()
        if self.mask_strategy is not None and self.mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"mask_strategy must be one of {MASK_STRATEGIES} or None, got {self.mask_strategy!r}")
        if self.mask_strategy == "file" and not self.mask_path:
            raise ValueError("mask_strategy='file' needs mask_path (a file written by SparseMask.save)")
        if self.mask_strategy == "diff" and not (self.mask_diff_base and self.mask_diff_tuned):
            raise ValueError("mask_strategy='diff' needs mask_diff_base and mask_diff_tuned (two checkpoints)")
        if self.mask_strategy != "file" and self.mask_path:
            raise ValueError(f"mask_path is only used with mask_strategy='file', not {self.mask_strategy!r}")
        if not 0 < self.mask_density <= 1:
            raise ValueError(f"mask_density must be in (0, 1], got {self.mask_density}")
        if self.mask_diff_threshold < 0:
            raise ValueError(f"mask_diff_threshold must be >= 0, got {self.mask_diff_threshold}")
        try:
            self.mask_block_weights = parse_block_weights(self.mask_block_weights)
        except ValueError as err:
            raise ValueError(f"mask_block_weights: {err}") from None
        if self.mask_probe_steps < 1:
            raise ValueError(f"mask_probe_steps must be >= 1, got {self.mask_probe_steps}")
        if self.mask_gradient_steps < 1:
            raise ValueError(f"mask_gradient_steps must be >= 1 (rollout batches to score), got "
                             f"{self.mask_gradient_steps}")
        if self.mask_gradient_statistic not in GRADIENT_STATISTICS:
            raise ValueError(f"mask_gradient_statistic must be one of {GRADIENT_STATISTICS}, got "
                             f"{self.mask_gradient_statistic!r}")
        if self.weight_stats_tau < 0:
            raise ValueError(f"weight_stats_tau must be >= 0, got {self.weight_stats_tau}")


def template_fields(template: str) -> set[str]:
    """Names of the `{fields}` of a format string (raises on a malformed template)."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as error:
        raise ValueError(f"teacher_prompt_template {template!r} is not a valid format string: {error}") from None
