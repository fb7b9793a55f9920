"""The on-policy distillation job: `sparse-opd train` runs it, `examples/opd_math.py` shows its steps.

    sparse-opd train                                   # the default run: the `gpu` preset on a GPU, `cpu` otherwise
    sparse-opd train --config smoke                    # a preset by name, or any YAML file of flags
    sparse-opd train --model_name_or_path Qwen/Qwen3-1.7B --teacher_model_name_or_path Qwen/Qwen3-8B \\
        --dataset_name openai/gsm8k --dataset_config main --config gpu

Every field of TRL's `ScriptArguments` (through `JobArguments`) and `ModelConfig`, and of `SparseOPDConfig` (so of
TRL's `DistillationConfig` and transformers' `TrainingArguments`) is a flag; a `--config` file (TRL's `TrlParser`)
sets defaults that flags override. Flags the job has no use for are refused when parsed (`arguments.NOT_USED`).

Modules: `arguments` (flags, presets, checks), `models` (device, student, teacher), `data` (datasets and how they
are described), `evaluation` (what can be scored, the answer length, scores, the teacher-student divergence),
`training` (the trainer and the save), `summary` (the closing report and the line saying the student got worse),
`console` (output and errors).
"""

from __future__ import annotations

import time

from .arguments import PRESETS, Arguments, JobArguments, parse_args
from .console import console, errors_in_one_line, quiet, say
from .data import load_data
from .evaluation import evaluate


def _timed(phase: str):
    """Record a step's wall time in `OPDJob.phases` (the summary lists the phases, which add up to the total)."""
    import functools

    def wrap(step):
        @functools.wraps(step)
        def timed(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return step(self, *args, **kwargs)
            finally:
                self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - started

        return timed

    return wrap


class OPDJob:
    """The job's state and its steps, in the order `run` takes them (examples/opd_math.py calls them one by one).

    Args:
        args: the parsed arguments (`parse_args`, or `OPDJob.from_command_line`).
    """

    def __init__(self, args: Arguments):
        self.args = args
        self.started = time.perf_counter()
        self.phases: dict[str, float] = {}  # seconds by phase, in the order they ran
        self.results: dict = {}  # EvalResult by label: "student before", "teacher", "student after"
        self.divergences: dict = {}  # DivergenceResult by label: "student before", "student after"
        self.student = self.tokenizer = self.teacher = self.trainer = None
        self.train_data = self.test_data = self.plan = self.answer_length = None

    @classmethod
    def from_command_line(cls, argv: list[str] | None = None, prog: str | None = None) -> OPDJob:
        """Parse the flags over a preset; refused flags and bad paths end here, before anything loads."""
        return cls(parse_args(argv, prog))

    @_timed("data")
    def load_data(self) -> None:
        """The training and held-out data, with the teacher's prompts; checks that the teacher has a context and
        says how the run will be evaluated (`evaluation.plan`)."""
        from ..trainer.privileged import check_teacher_context
        from .data import check_teacher, load_data, with_teacher_prompts
        from .evaluation import plan

        config = self.args.training
        train, test = load_data(self.args.job)
        self.train_data, self.test_data = (with_teacher_prompts(part, config) for part in (train, test))
        self.plan = plan(self.args, self.test_data)
        check_teacher(self.args, self.train_data)
        check_teacher_context(config, config.teacher_model_name_or_path, self.train_data)
        say(self.plan.reason)

    @_timed("models")
    def load_models(self) -> None:
        """The device (printed with the reason it was chosen), the student and its tokenizer, and the teacher."""
        from .data import teacher_sees
        from .models import describe_device, load_student, load_teacher, share_cpu_threads

        say(describe_device(self.args))
        share_cpu_threads(self.args.training)
        self.student, self.tokenizer = load_student(self.args)
        self.teacher = load_teacher(self.args)
        say(f"student: {self.student.name_or_path}; teacher: "
            f"{teacher_sees(self.args.job, self.args.training, self.teacher, self.train_data)}")

    @_timed("evaluation before")
    def evaluate_before(self) -> None:
        """Is the teacher worth distilling? The student's and the teacher's scores (warnings when the teacher is not
        clearly better, or is shown only final answers), and the teacher-student divergence the training minimizes."""
        from ..tasks import teacher_warnings
        from .evaluation import answer_length, divergence, evaluate_teacher, teacher_reads_privileged_context

        if self.plan.scored:
            self.answer_length = answer_length(self.args, self.tokenizer, self.train_data, self.test_data)
            say(f"answer length: {self.answer_length.reason}")
            tokens = int(self.answer_length)
            self.results["student before"] = evaluate(self.student, self.tokenizer, self.test_data, self.args,
                                                      desc=self._bar("evaluation (student)"), max_new_tokens=tokens)
            self.results["teacher"] = evaluate_teacher(self.student, self.teacher, self.tokenizer, self.test_data,
                                                       self.args, self._bar("evaluation (teacher)"), tokens)
            say(f"student before: {self.results['student before']}\nteacher:        {self.results['teacher']}")
            privileged = teacher_reads_privileged_context(self.teacher, self.args.training)
            for line in teacher_warnings(self.results["student before"], self.results["teacher"], self.train_data,
                                         privileged=privileged):
                say(line)
        if self.plan.divergence:
            self.divergences["student before"] = divergence(self.student, self.teacher, self.tokenizer,
                                                            self.test_data, self.args,
                                                            desc=self._bar("divergence (student)"))
            say(f"divergence from the teacher before: {self.divergences['student before']}")

    def train(self) -> None:
        """Discover the coordinates (inside `SparseOPDTrainer`: --mask_strategy) and distill into the sparse delta."""
        from .training import make_trainer

        started = time.perf_counter()
        self.trainer = make_trainer(self.student, self.teacher, self.tokenizer, self.train_data, self.test_data,
                                    self.args)  # the probe and the priors build the mask here
        built = time.perf_counter()
        self.trainer.train(resume_from_checkpoint=self.args.training.resume_from_checkpoint)
        report = getattr(getattr(self.trainer, "discovery", None), "report", None)
        discovery = (built - started) + (report["seconds"] if report else 0.0)  # gradient discovery: in train()
        self.phases["discovery"] = discovery
        self.phases["training"] = time.perf_counter() - started - discovery

    @_timed("evaluation after")
    def evaluate_after(self) -> None:
        """The trained student on the same held-out rows: its score, and its divergence from the teacher."""
        from .evaluation import divergence
        from .summary import divergence_change

        if self.plan.scored:
            self.results["student after"] = evaluate(self.trainer.model, self.tokenizer, self.test_data, self.args,
                                                     desc=self._bar("evaluation (after)"), trainer=self.trainer,
                                                     max_new_tokens=int(self.answer_length))
            say(f"student after:  {self.results['student after']}")
        if self.plan.divergence:
            self.divergences["student after"] = divergence(self.trainer.model, self.teacher, self.tokenizer,
                                                           self.test_data, self.args, trainer=self.trainer,
                                                           desc=self._bar("divergence (after)"))
            say(f"divergence from the teacher after:  {self.divergences['student after']}\n"
                f"{divergence_change(self.divergences)}")

    @_timed("saving")
    def save(self) -> None:
        """Save (or push) the adapter with a card that states what it is and what it scored."""
        from .data import task_description
        from .training import save

        save(self.trainer, self.results, task_description(self.args.job), self.divergences, self.answer_length)

    def report(self) -> None:
        """Print the summary (main process): scores and gain, coordinates, adapter, the analyzer's findings."""
        from .data import task_description
        from .summary import summary

        if self.trainer.is_world_process_zero():
            say(summary(self.trainer, self.args, self.results, task_description(self.args.job), self.started,
                        self.divergences, self.phases))

    def run(self) -> dict:
        """Every step in order; returns the `EvalResult`s by label (empty when the answers cannot be scored: the
        `DivergenceResult`s are in `divergences`)."""
        for step in (self.load_data, self.load_models, self.evaluate_before, self.train, self.evaluate_after,
                     self.save, self.report):
            step()
        return self.results

    def _bar(self, label: str) -> str | None:
        return None if self.args.training.disable_tqdm else label


def main(argv: list[str] | None = None, prog: str | None = None, traceback: bool = False) -> int:
    """Run the job from a command line; bad input ends it in one line (``traceback`` or --verbose: re-raised)."""
    import os
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    with console(argv, prog or os.path.basename(sys.argv[0]), traceback):
        OPDJob.from_command_line(argv, prog).run()
    return 0


__all__ = ["PRESETS", "Arguments", "JobArguments", "OPDJob", "console", "errors_in_one_line", "evaluate",
           "load_data", "main", "parse_args", "quiet", "say"]
