"""The job's closing report: scores with their paired gain, what was trained and saved, the analyzer's summary."""

from __future__ import annotations

import time
from pathlib import Path

from .arguments import Arguments


def summary(trainer, args: Arguments, results: dict, task: str, started: float) -> str:
    """The closing report, as lines of text (`results`: `EvalResult`s by label, with "student before" and "student
    after"; `started`: `time.perf_counter()` at the start of the run)."""
    from ..tuner.model_card import coverage

    before, after = results["student before"], results["student after"]
    coordinates, entries, matrices = coverage(trainer.model.peft_config[trainer.adapter_name])
    gain, se = after.gain_over(before)
    adapter = Path(trainer.args.output_dir) / "adapter_model.safetensors"
    lines = ["", "== summary ==", f"task: {task}; {after.num_examples} held-out problems"]
    lines += [f"{label + ':':16}{result}" for label, result in results.items()]
    lines.append(f"gain: {100 * gain:+.1f} +/- {100 * se:.1f} points (paired over the same problems)")
    lines.append(f"trained coordinates: {coordinates:,} = {100 * coordinates / max(entries, 1):.2f}% of "
                 f"{matrices} weight matrices (mask: {trainer.args.mask_strategy or 'given'})")
    lines.append(f"adapter: {adapter} ({adapter.stat().st_size / 2**20:.2f} MiB) with its model card (README.md)")
    if args.job.analyze:
        lines += analysis(trainer, args)
    if trainer.args.push_to_hub:
        lines.append(f"pushed to the Hub: {trainer.hub_model_id}")
    lines.append(f"total time: {time.perf_counter() - started:.0f}s")
    return "\n".join(lines)


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
