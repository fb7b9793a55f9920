"""The model card of a sparse OPD adapter: what it is, how to load it, how it was trained, what it scored, and whose
methods it uses. It replaces TRL's generic draft (whose quick start would load the base model, not the adapter)."""

from __future__ import annotations

import os

from ..tuner.model_card import embedded_base_note, loading_code

CREDITS = """## Methods and credits

- On-policy distillation with the generalized Jensen-Shannon divergence: R. Agarwal et al., *On-Policy Distillation of
  Language Models: Learning from Self-Generated Mistakes* (GKD), ICLR 2024, as implemented by TRL's
  `DistillationTrainer`.
- Training only the coordinates on-policy distillation moves: Yu et al., *Dense Supervision, Sparse Updates*, 2026.
- The SparseDelta PEFT method, masks and trainer: the `sparse-opd` Python package (installed from its source; it is
  not on PyPI)."""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _score_rows(results: dict) -> list[str]:
    """One row per `EvalResult`: the headline score (for `math_accuracy`: the final answer, as the benchmark's users
    find it) beside the strict `Answer: <n>` format's accuracy and miss rate (a dash where the metric has none)."""
    first = next(iter(results.values()))
    packaged = first.metric == "math_accuracy"
    headline = "accuracy (final answer)" if packaged else _cell(first.metric)
    lines = [f"| model | {headline} | accuracy in the strict 'Answer: <n>' format | format errors | rows |",
             "|---|---:|---:|---:|---:|"]
    for label, result in results.items():
        score = (f"{100 * result.accuracy:.1f}% +/- {100 * result.stderr:.1f}" if result.metric == "math_accuracy"
                 else f"{result.accuracy:.4g} +/- {result.stderr:.2g}")
        strict = "-" if result.strict_accuracy is None else f"{100 * result.strict_accuracy:.1f}%"
        errors = "-" if result.format_error_rate is None else f"{100 * result.format_error_rate:.0f}%"
        lines.append(f"| {label} | {score} | {strict} | {errors} | {result.num_examples} |")
    return lines


def _divergence_rows(divergences: dict) -> list[str]:
    """One row per `DivergenceResult` (the held-out teacher-student divergence on the student's own samples), and
    the paired change when there is a before and an after."""
    from ..tasks.divergence import divergence_name

    first = next(iter(divergences.values()))
    lines = [f"| model | {_cell(divergence_name(first.beta))}, nats/token | prompts | sampled tokens |",
             "|---|---:|---:|---:|"]
    for label, result in divergences.items():
        lines.append(f"| {label} | {result.mean:.4f} +/- {result.stderr:.4f} | {result.num_prompts} | "
                     f"{result.num_tokens} |")
    if "student before" in divergences and "student after" in divergences:
        change, se = divergences["student after"].change_from(divergences["student before"])
        lines.append("")
        lines.append(f"Change: {change:+.3g} +/- {se:.2g} nats/token, paired over the same prompts (negative: closer "
                     "to the teacher). On-policy distillation minimizes this divergence on the student's own samples.")
    return lines


def _results(results: dict | None, divergences: dict | None = None, regressions: list[str] | None = None,
             evaluation: str | None = None) -> str:
    """The card's results section: scores (`EvalResult`s by label), the teacher-student divergence
    (`DivergenceResult`s by label), and the plain line(s) saying the student got worse, first, when it did."""
    if not results and not divergences:
        return ""
    lines = ["## Results", ""]
    lines += [f"**{line}**\n" for line in regressions or []]
    if evaluation:
        lines += [f"Evaluation on held-out rows: {evaluation}.", ""]
    if results:
        lines += _score_rows(results)
    if results and divergences:
        lines.append("")
    if divergences:
        lines += _divergence_rows(divergences)
    return "\n".join(lines)


def opd_model_card(trainer, model_name: str, task: str | None = None, teacher: str | None = None,
                   results: dict | None = None, tags=None, divergences: dict | None = None,
                   regressions: list[str] | None = None, evaluation: str | None = None) -> str:
    """The full card (YAML metadata + Markdown) for ``trainer``'s adapter."""
    from huggingface_hub import ModelCard, ModelCardData

    args = trainer.args
    config = trainer.model.peft_config[trainer.adapter_name]
    base = config.base_model_name_or_path or "the base model"
    total, entries, matrices = config.coverage()
    share = 100 * total / max(entries, 1)
    mask = args.mask_strategy or "given"
    if args.mask_strategy in ("probe", "near_zero", "random"):
        mask += f", {args.mask_block_weights}-weighted, density {args.mask_density}"
    if args.mask_strategy == "probe":
        mask += f", {args.mask_probe_steps} dense OPD steps at {args.mask_probe_learning_rate}"
    hub_id = None if os.path.isabs(base) or os.path.exists(base) or base == "the base model" else base
    prompts = args.per_device_train_batch_size * args.gradient_accumulation_steps * trainer.accelerator.num_processes
    steps = (f"{trainer.state.global_step} steps x {prompts} prompts, completions up to {args.max_completion_length} "
             f"tokens, generalized JSD with beta={args.beta} (0 = forward KL, 1 = reverse KL), temperature "
             f"{args.temperature}, AdamW learning rate {args.learning_rate}")
    data = ModelCardData(base_model=hub_id, library_name="peft",
                         pipeline_tag="text-generation", tags=sorted({*trainer._tag_names, "on-policy-distillation",
                                     *([tags] if isinstance(tags, str) else tags or [])}))
    body = f"""
# {model_name}

A **SparseDelta** adapter for `{base}`: trained values on {total:,} fixed coordinates ({share:.2f}% of the
entries of {matrices} weight matrices), learned by on-policy distillation. Everything else in the model is
the base model's, bit for bit.

{loading_code(base, embedded_base_note(trainer.model))}

## Training

- task: {task or "see the training data"}
- teacher: {teacher or "see `teacher_model_name_or_path`"}
- coordinates: {mask}
- on-policy distillation: {steps}

{_results(results, divergences, regressions, evaluation)}

{CREDITS}
"""
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body))
