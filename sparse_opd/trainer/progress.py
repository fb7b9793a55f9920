"""A progress bar per phase of a run, with the metrics that matter in the bar instead of TRL's log dictionaries."""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

SHOWN = {"loss": "loss", "rollout/logp_abs_diff": "rollout gap", "sparse/update_norm": "update"}


class PhaseProgress(TrainerCallback):
    """A tqdm bar named after the phase ("discovery", "training"), its postfix the latest loss, rollout/training
    log-probability gap and update norm. Replaces transformers' `ProgressCallback` (see `replace_default`)."""

    def __init__(self, phase: str):
        self.phase = phase
        self.bar = None

    @staticmethod
    def replace_default(trainer) -> None:
        """Drop the default progress / printer callbacks of ``trainer`` (keep a `PhaseProgress` if it has one)."""
        for callback in (ProgressCallback, PrinterCallback):
            trainer.remove_callback(callback)

    def on_train_begin(self, args, state, control, **kwargs):
        if args.process_index == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, desc=self.phase, unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            shown = {label: f"{logs[key]:.3g}" for key, label in SHOWN.items() if isinstance(logs.get(key), float)}
            if shown:
                self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
