"""The job's closing report: scores with their paired gain, what was trained and saved, the analyzer's summary."""

from __future__ import annotations

import time
from pathlib import Path

from .arguments import Arguments


def summary(trainer, args: Arguments, results: dict, task: str, started: float, divergences: dict | None = None,
            phases: dict[str, float] | None = None) -> str:
    """The closing report, as lines of text (`results`: `EvalResult`s by label, "student before", "teacher" and
    "student after", when the answers were scored; `divergences`: `DivergenceResult`s "student before" and "student
    after", when the divergence was measured; `started`: `time.perf_counter()` at the start of the run; `phases`:
    seconds by phase)."""
    coordinates, entries, matrices = trainer.model.peft_config[trainer.adapter_name].coverage()
    adapter = Path(trainer.args.output_dir) / "adapter_model.safetensors"
    lines = ["", "== summary ==", f"task: {task}; {held_out(results, divergences)}"]
    lines += score_lines(results, divergences)
    lines.append(f"trained coordinates: {coordinates:,} = {100 * coordinates / max(entries, 1):.2f}% of "
                 f"{matrices} weight matrices (mask: {trainer.args.mask_strategy or 'given'})")
    lines += discovery_lines(trainer)
    lines.append(f"adapter: {adapter} ({adapter.stat().st_size / 2**20:.2f} MiB) with its model card (README.md)")
    if args.job.analyze:
        lines += analysis(trainer, args)
    if trainer.args.push_to_hub:
        lines.append(f"pushed to the Hub: {trainer.hub_model_id}")
    lines.append(time_line(phases or {}, time.perf_counter() - started))
    return "\n".join(lines)


def discovery_lines(trainer) -> list[str]:
    """What gradient discovery did (`mask_strategy="gradient"`), in one line; nothing for other strategies."""
    report = getattr(getattr(trainer, "discovery", None), "report", None)
    if not report:
        return []
    return [(f"discovery: {report['statistic']} of the OPD gradient over {report['batches']} rollout batches "
             f"({report['micro_batches']} micro-batches, {report['tokens']:,} completion tokens) in "
             f"{report['seconds']:.0f}s, {report['accumulator_bytes_per_entry']:.1f} B per adapted weight entry per "
             f"process")]


def time_line(phases: dict[str, float], total: float) -> str:
    """The run's wall time by phase; the phases and "other" (the summary itself, the analyzer) add up to the total."""
    if not phases:
        return f"total time: {total:.0f}s"
    shown = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in phases.items())
    return f"total time: {total:.0f}s ({shown}, other {max(0.0, total - sum(phases.values())):.0f}s)"


def held_out(results: dict, divergences: dict | None) -> str:
    """How many held-out rows the scores (or the divergence) were measured on, in words."""
    if results:
        return f"{next(iter(results.values())).num_examples} held-out problems"
    if divergences:
        return f"{next(iter(divergences.values())).num_prompts} held-out prompts"
    return "nothing evaluated"


def score_lines(results: dict, divergences: dict | None = None) -> list[str]:
    """The scores by label, the paired gain, the divergence before and after with its paired change, and, when the
    student got worse beyond noise, the one line that says so (`regressions`)."""
    lines = [f"{label + ':':16}{result}" for label, result in results.items()]
    if "student before" in results and "student after" in results:
        lines.append(gain_line(results["student before"], results["student after"]))
    if divergences and "student after" in divergences:
        lines.append(f"divergence from the teacher before: {divergences['student before']}")
        lines.append(f"divergence from the teacher after:  {divergences['student after']}")
        lines.append(divergence_change(divergences))
    return lines + regressions(results, divergences)


def gain_line(before, after) -> str:
    """The change of the headline score: paired over the same rows when the metric scores each one."""
    scale, unit, digits = (100, " points", 1) if after.metric == "math_accuracy" else (1, "", 4)
    if before.correct and after.correct:
        gain, se = after.gain_over(before)
        return f"gain: {scale * gain:+.{digits}f} +/- {scale * se:.{digits}f}{unit} (paired over the same problems)"
    gain = after.accuracy - before.accuracy
    return f"gain: {scale * gain:+.{digits}f}{unit} ({after.metric} gives no per-example scores to pair)"


def divergence_change(divergences: dict) -> str:
    """The divergence's change over training, paired over the same prompts, in one line."""
    change, se = divergences["student after"].change_from(divergences["student before"])
    return (f"divergence change: {change:+.3g} +/- {se:.2g} nats/token, paired over the same prompts "
            f"({'closer to' if change < 0 else 'further from'} the teacher)")


def regressions(results: dict, divergences: dict | None = None) -> list[str]:
    """One plain line for each measure by which the student got worse beyond noise (`sparse_opd.tasks
    .regression_line`): its score, its divergence from the teacher."""
    from ..tasks import regression_line

    pairs = [(results.get("student before"), results.get("student after")),
             ((divergences or {}).get("student before"), (divergences or {}).get("student after"))]
    return [line for before, after in pairs if before is not None and after is not None
            for line in [regression_line(before, after)] if line]


def analysis(trainer, args: Arguments) -> list[str]:
    """The analyzer's summary of the learned delta against the student's base checkpoint (saved beside the adapter)."""
    from ..analysis import analyze_delta

    report = analyze_delta(base_checkpoint(args), trainer.args.output_dir, progress=False)
    saved = report.save(str(Path(trainer.args.output_dir) / "analysis"), plots=False)
    return [f"analyzer ({saved[0]}; `sparse-opd analyze` for plots):",
            *("  " + line for line in report.summary().splitlines())]


def base_checkpoint(args: Arguments) -> str:
    """The local files of the student's base weights (at --model_revision for a Hub id)."""
    import os

    from ..embedded import resolve_model_path

    name, revision = args.model.model_name_or_path, args.model.model_revision
    path = resolve_model_path(name)
    if os.path.isdir(path) or revision in (None, "main"):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, revision=revision, allow_patterns=["*.safetensors", "*.json"])
