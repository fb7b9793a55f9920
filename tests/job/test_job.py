"""The main job: `examples/opd_math.py` and `sparse-opd train` end to end on a tiny model saved to disk (the default
embedded model is for the real run), its flags and presets, a user's data of every kind, and quiet output."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from sparse_opd import job
from sparse_opd.cli import main as cli_main
from sparse_opd.job import arguments
from sparse_opd.job import models as job_models
from sparse_opd.job.models import describe_device
from tests.helpers import ROOT
from tests.helpers.tiny_opd import tiny_llama, tiny_tokenizer

EXAMPLE = ROOT / "examples" / "opd_math.py"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("opd_math", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-student")
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def smoke(model_dir, out, *more):
    return ["--config", "smoke", "--model_name_or_path", model_dir, "--output_dir", str(out), "--mask_density", "0.1",
            "--num_train", "16", *more]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------------------------------------------ flags
@pytest.fixture
def no_accelerator(monkeypatch):
    monkeypatch.setattr(arguments, "accelerator_available", lambda: False)


def test_the_cpu_preset_is_the_default_without_an_accelerator_and_flags_override_it(no_accelerator):
    args = job.parse_args(["--output_dir", "x"])
    config = args.training
    assert args.preset == "cpu" and args.preset_from_machine
    assert config.mask_strategy == "probe" and config.max_steps == 24 and config.use_cpu and not config.bf16
    assert args.model.model_name_or_path == "embedded" and args.model.dtype == "float32"
    assert args.job.num_eval == 64 and config.output_dir == "x"
    args = job.parse_args(["--config", "smoke", "--max_steps", "5", "--mask_density", "0.02"])
    assert args.training.max_steps == 5 and args.training.mask_density == 0.02
    assert args.training.mask_probe_steps == 1 and args.job.num_eval == 8 and not args.preset_from_machine


@pytest.mark.parametrize("launch", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_a_sharded_launch_trains_the_near_zero_prior_instead_of_the_presets_probe(no_accelerator, monkeypatch,
                                                                                   capsys, launch):
    monkeypatch.setenv(launch, "true")
    args = job.parse_args(["--config", "smoke", "--output_dir", "x"])
    assert args.training.mask_strategy == "near_zero"
    assert "the preset's probe cannot run under" in capsys.readouterr().out
    with pytest.raises(ValueError, match="mask_strategy='probe'.*mask_strategy='near_zero'"):
        job.parse_args(["--config", "smoke", "--output_dir", "x", "--mask_strategy", "probe"])
    assert job.parse_args(["--config", "smoke", "--output_dir", "x", "--mask_strategy", "gradient"]
                          ).training.mask_strategy == "gradient"


def test_the_gpu_preset_is_the_default_where_there_is_an_accelerator(monkeypatch):
    monkeypatch.setattr(arguments, "accelerator_available", lambda: True)
    assert arguments.default_preset() == "gpu"
    args = job.parse_args(["--bf16", "false"])  # this CPU cannot validate bf16; everything else is the gpu preset's
    assert args.preset == "gpu" and args.preset_from_machine
    assert not args.training.use_cpu and args.model.dtype == "bfloat16" and args.training.max_steps == 500
    assert args.model.model_name_or_path == "embedded"


def test_the_job_says_which_device_and_why(no_accelerator, tmp_path):
    line = describe_device(job.parse_args(["--output_dir", str(tmp_path)]))
    assert line == "device: cpu (the `cpu` preset: no accelerator found)"
    line = describe_device(job.parse_args(["--config", "smoke", "--output_dir", str(tmp_path)]))
    assert line == "device: cpu (--config smoke)"


def test_a_users_yaml_file_is_a_config_too(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model_name_or_path: embedded\nmax_steps: 3\nmask_strategy: random\nnum_eval: 5\nuse_cpu: true\n"
                    "bf16: false\n")
    args = job.parse_args(["--config", str(path), "--num_eval", "6"])
    assert args.training.max_steps == 3 and args.training.mask_strategy == "random" and args.job.num_eval == 6
    assert args.preset == str(path)


def test_unknown_preset_names_the_presets():
    with pytest.raises(ValueError, match="not a preset .*cpu.*gpu.*smoke"):
        job.parse_args(["--config", "huge"])


def test_help_lists_every_flag_with_its_default(capsys, no_accelerator):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: sparse-opd train")
    out = out[out.index("\noptions:"):]
    for flag, default in [("--model_name_or_path", "embedded"), ("--mask_strategy", "probe"), ("--max_steps", "24"),
                          ("--teacher_model_name_or_path", "None"), ("--dataset_name", "None"), ("--config", "cpu"),
                          ("--model_revision", "main"), ("--dtype", "float32")]:
        assert flag in out
        section = out[out.index(f"  {flag} "):]
        assert f"(default: {default})" in " ".join(section[:900].split()), flag


def test_the_presets_ship_with_the_package():
    assert {p.stem for p in job.PRESETS.glob("*.yaml")} == {"cpu", "smoke", "gpu"}
    import tomllib

    pyproject = tomllib.loads((EXAMPLE.parents[1] / "pyproject.toml").read_text())
    assert "presets/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["sparse_opd"]


def test_the_flags_the_job_refuses_are_flags_of_its_parser(capsys, no_accelerator):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    listed = set(re.findall(r"^  --(\w+)", capsys.readouterr().out, re.MULTILINE))
    assert set(arguments.NOT_USED) <= listed, set(arguments.NOT_USED) - listed
    assert len(listed) > 200  # TRL's ScriptArguments and ModelConfig, JobArguments, SparseOPDConfig


@pytest.mark.parametrize("flags, message", [
    (["--use_peft"], "--use_peft True is refused: the job trains a sparse delta, not LoRA"),
    (["--lora_r", "8"], "--lora_r 8 is refused"),
    (["--dataset_streaming"], "--dataset_streaming True is refused: the job reads the whole dataset"),
    (["--ignore_bias_buffers"], "pass --ddp_broadcast_buffers false instead"),
    (["--label_smoothing_factor", "0.1"], "has no label smoothing"),
    (["--data_seed", "3"], "shuffles with --seed"),
    (["--do_predict"], "nothing to predict"),
    (["--max_tool_calling_iterations", "2"], "no tools"),
    (["--batch_eval_metrics"], "no compute_metrics"),
    (["--teacher_model_revision", "v2"], "--teacher_model_revision needs --teacher_model_name_or_path"),
    (["--teacher_model_init_kwargs", '{"dtype": "float16"}'], "--teacher_model_init_kwargs needs --teacher_model_"),
    (["--load_in_4bit"], "--mask_strategy probe reads (or trains) plain weights, which a 4-bit student"),
    (["--bnb_4bit_quant_type", "fp4"], "applies to a 4-bit student only"),
    (["--eval_dataset_name", "x.jsonl"], "--eval_dataset_name needs --dataset_name"),
])
def test_flags_the_job_does_not_use_are_refused_when_parsed(flags, message, no_accelerator):
    with pytest.raises(ValueError) as info:
        job.parse_args(flags)
    assert message in str(info.value)


@pytest.mark.parametrize("flags, message", [
    (["--mask_strategy", "file", "--mask_path", "{tmp}/nope.safetensors"], "--mask_path {tmp}/nope.safetensors does"),
    (["--mask_strategy", "file", "--mask_path", "/dev/zero"], "--mask_path /dev/zero is a character device"),
    (["--mask_strategy", "diff", "--mask_diff_base", "{tmp}", "--mask_diff_tuned", "./gone"],
     "--mask_diff_tuned ./gone does not exist"),
    (["--dataset_name", "{tmp}/nope.jsonl"], "--dataset_name {tmp}/nope.jsonl does not exist"),
    (["--dataset_name", "{tmp}/fifo"], "--dataset_name {tmp}/fifo is a FIFO, not a file or a directory"),
    (["--model_name_or_path", "{tmp}/fifo"], "is a FIFO, not a directory or a Hub id"),
    (["--teacher_model_name_or_path", "./no-teacher"], "--teacher_model_name_or_path ./no-teacher does not exist"),
    (["--resume_from_checkpoint", "{tmp}/checkpoint-9"], "--resume_from_checkpoint {tmp}/checkpoint-9 does not exist"),
    (["--output_dir", "/dev/null"], "--output_dir /dev/null is a character device, not a directory"),
    (["--mask_save_path", "{tmp}"], "--mask_save_path {tmp} is a directory"),
])
def test_every_path_is_checked_before_any_model_loads(flags, message, tmp_path, no_accelerator):
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises((ValueError, OSError)) as info:
        job.parse_args([flag.format(tmp=tmp_path) for flag in flags])
    assert message.format(tmp=tmp_path) in str(info.value)


def test_a_missing_mask_file_ends_the_job_before_the_student_loads(monkeypatch, tmp_path, no_accelerator):
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the paths were checked")

    monkeypatch.setattr(job_models, "load_student", must_not_load)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--mask_strategy", "file", "--mask_path", str(tmp_path / "m.safetensors")])
    assert str(exit_info.value) == (f"sparse-opd train: error: --mask_path {tmp_path / 'm.safetensors'} does not "
                                    "exist (--verbose for the traceback)")


def test_init_kwargs_revision_and_dtype_reach_the_models(tiny_model_dir, monkeypatch, no_accelerator):
    from transformers import AutoModelForCausalLM

    calls = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, path, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    args = job.parse_args(["--model_name_or_path", tiny_model_dir, "--model_init_kwargs", '{"dtype": "bfloat16"}',
                           "--teacher_model_name_or_path", tiny_model_dir, "--teacher_model_revision", "v2",
                           "--teacher_model_init_kwargs", '{"dtype": "float16"}', "--attn_implementation", "eager"])
    student, _ = job_models.load_student(args)
    teacher = job_models.load_teacher(args)
    assert student.dtype == torch.bfloat16 and teacher.dtype == torch.float16
    assert calls[0]["revision"] == "main" and calls[1]["revision"] == "v2"
    assert calls[0]["attn_implementation"] == calls[1]["attn_implementation"] == "eager"
    args = job.parse_args(["--model_name_or_path", tiny_model_dir, "--dtype", "bfloat16"])
    assert job_models.load_student(args)[0].dtype == torch.bfloat16


def test_global_options_come_before_the_command(monkeypatch):
    seen = {}

    def fake_main(argv, prog=None, traceback=False):
        seen.update(argv=argv, prog=prog, traceback=traceback)
        return 0

    monkeypatch.setattr(job, "main", fake_main)
    assert cli_main(["--traceback", "train", "--max_steps", "1"]) == 0
    assert seen == {"argv": ["--max_steps", "1"], "prog": "sparse-opd train", "traceback": True}
    assert cli_main(["train", "--max_steps", "1"]) == 0 and seen["traceback"] is False


def test_traceback_keeps_the_exception_of_a_refused_flag(no_accelerator):
    with pytest.raises(ValueError, match="--teacher_model_revision needs"):
        cli_main(["--traceback", "train", "--teacher_model_revision", "v2"])
    with pytest.raises(SystemExit, match=r"^sparse-opd train: error: --teacher_model_revision needs"):
        cli_main(["train", "--teacher_model_revision", "v2"])


# ------------------------------------------------------------------------------------------------------ runs
def test_example_discovers_trains_and_reports(example, tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "run"
    example.main(smoke(tiny_model_dir, out_dir))
    out = capsys.readouterr().out
    for line in ("device: cpu (--config smoke)", "student before:", "teacher:", "student after:", "gain:",
                 "trained coordinates:", "(mask: probe)",
                 f"adapter: {out_dir / 'adapter_model.safetensors'}", "analyzer (", "FFN share of update energy:",
                 "total time:"):
        assert line in out, line
    assert "{'loss'" not in out  # TRL's log dictionaries only with --verbose
    card = (out_dir / "README.md").read_text()
    for text in ("import sparse_opd", "PeftModel", "## Results", "| student after |", "task: synthetic arithmetic",
                 "Dense Supervision, Sparse Updates", "GKD", "probe, ffn-weighted, density 0.1"):
        assert text in card, text
    assert "fine-tuned version of" not in card and 'model="None"' not in card
    assert (out_dir / "analysis" / "report.json").is_file()


def test_sparse_opd_train_runs_the_same_job_on_separate_train_and_eval_files(tiny_model_dir, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
        for a in range(1, 6) for b in range(1, 5)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"question": f"What is {a} * 3?", "answer": 3 * a} for a in range(5)])
    assert cli_main(["train", *smoke(tiny_model_dir, tmp_path / "run", "--dataset_name", train,
                                     "--eval_dataset_name", test, "--num_eval", "5", "--analyze", "false")]) == 0
    out = capsys.readouterr().out
    assert "train.jsonl (train): 20 rows kept, 0 skipped" in out
    assert "test.jsonl (eval): 5 rows kept" in out
    assert "20 of 20 rows have a worked solution" in out
    assert "5 held-out problems" in out


def test_a_separate_teacher_sees_the_students_prompt_and_loads_with_its_own_flags(tiny_model_dir, tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, seed=1).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    # --teacher_model_init_kwargs used to fail after both evaluations ("teacher_model is already instantiated")
    assert cli_main(["train", *smoke(tiny_model_dir, tmp_path / "run", "--teacher_model_name_or_path",
                                     str(teacher_dir), "--teacher_model_revision", "main",
                                     "--teacher_model_init_kwargs", '{"dtype": "float32"}',
                                     "--mask_strategy", "random", "--analyze", "false")]) == 0
    out = capsys.readouterr().out
    assert f"teacher: {teacher_dir}, shown the student's own prompt" in out and "(mask: random)" in out


def test_eval_strategy_evaluates_the_held_out_problems_during_training(tiny_model_dir, tmp_path, capsys):
    assert cli_main(["train", *smoke(tiny_model_dir, tmp_path / "run", "--eval_strategy", "steps", "--eval_steps", "1",
                                     "--mask_strategy", "random", "--analyze", "false", "--verbose")]) == 0
    assert capsys.readouterr().out.count("'eval_loss'") == 2  # max_steps 2 of the smoke preset


def test_an_8bit_student_trains_through_the_job(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    assert cli_main(["train", *smoke(tiny_model_dir, tmp_path / "run", "--load_in_8bit", "--mask_strategy", "random",
                                     "--analyze", "false")]) == 0
    assert "trained coordinates:" in capsys.readouterr().out
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------------ data
def data_args(path, **kw):
    return job.JobArguments(dataset_name=str(path), **{"num_eval": 2, **kw})


def test_rows_with_a_worked_solution_a_final_answer_or_gsm8k_answer(tmp_path, capsys):
    rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7. Answer: 7"},  # worked, stated
        {"question": "What is 6 * 7?", "answer": 42},  # final answer only (a number)
        {"question": "What is 10 - 4?", "answer": "6"},  # final answer only (text)
        {"question": "Half of 9?", "answer": "9 / 2 = 4.5\n#### 4.5"},  # GSM8K style
        {"question": "What is 2 + 2?", "answer": "#### 4"},  # GSM8K style, no working
    ]
    train, test = job.load_data(data_args(write_jsonl(tmp_path / "qa.jsonl", rows)))
    by_question = {r["prompt"][-1]["content"].split("\n")[0]: r for r in [*train, *test]}
    assert len(by_question) == 5 and "held out 2 rows" in capsys.readouterr().out
    row = next(r for q, r in by_question.items() if "apples" in q)
    assert row["answer"] == "7" and row["solution"] == "3 + 4 = 7. Answer: 7" and row["worked_solution"]
    row = next(r for q, r in by_question.items() if "6 * 7" in q)
    assert row["answer"] == "42" and row["solution"] == "Answer: 42" and not row["worked_solution"]
    assert "Answer: 42" in row["teacher_prompt"][-1]["content"]  # what the teacher is shown without a solution
    row = next(r for q, r in by_question.items() if "Half" in q)
    assert row["answer"] == "4.5" and row["solution"] == "9 / 2 = 4.5\nAnswer: 4.5" and row["worked_solution"]
    row = next(r for q, r in by_question.items() if "2 + 2" in q)
    assert row["answer"] == "4" and not row["worked_solution"]


def test_a_solution_column(tmp_path):
    rows = [{"q": f"What is {a} + 1?", "final": a + 1, "work": f"{a} + 1 = {a + 1}"} for a in range(4)]
    train, _ = job.load_data(data_args(write_jsonl(tmp_path / "qa.jsonl", rows), question_column="q",
                                       answer_column="final", solution_column="work"))
    assert all(r["worked_solution"] and r["solution"].endswith(f"Answer: {r['answer']}") for r in train)


def test_csv_files_are_read_too(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\n" + "".join(f"What is {a} + 2?,{a + 2}\n" for a in range(5)))
    train, test = job.load_data(data_args(path))
    assert len(train) == 3 and len(test) == 2


def test_no_eval_row_is_trained_on(tmp_path):
    rows = [{"question": f"What is {a} + 100?", "answer": a + 100} for a in range(30)]
    train, test = job.load_data(data_args(write_jsonl(tmp_path / "qa.jsonl", rows), num_eval=7))
    assert len(test) == 7 and len(train) == 23
    assert not {r["answer"] for r in train} & {r["answer"] for r in test}


def test_a_missing_column_is_a_one_line_error(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 1 + 1?", "answer": 2}] * 4)
    with pytest.raises(ValueError, match=r"has no column 'final' \(columns: \['question', 'answer'\]\); pass the "
                                         r"right --question_column / --answer_column"):
        job.load_data(data_args(path, answer_column="final"))
    with pytest.raises(ValueError, match=r"has no column 'text' \(columns: \['question', 'answer'\]\); pass the "
                                         r"right --prompt_column"):
        job.load_data(data_args(path, prompt_column="text"))


def test_an_empty_file_is_a_one_line_error(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        job.load_data(data_args(path))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *smoke(tiny_model_dir, tmp_path / "o", "--dataset_name", str(path))])
    assert str(exit_info.value) == f"sparse-opd train: error: {path} is empty (--verbose for the traceback)"


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        job.load_data(data_args(tmp_path / "nope.jsonl"))


def test_unparseable_answers_are_counted_and_skipped_or_refused(tmp_path, capsys):
    rows = [{"question": f"What is {a} + 1?", "answer": a + 1} for a in range(6)]
    rows += [{"question": "Why?", "answer": "because"}, {"question": "Who?", "answer": None}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    train, test = job.load_data(data_args(path))
    assert len(train) + len(test) == 6
    assert "2 skipped (answer with no number)" in capsys.readouterr().out
    with pytest.raises(ValueError,
                       match=r"qa.jsonl: 2 of 8 rows have an answer with no number \(row 6: 'because'\); answers"):
        job.load_data(data_args(path, on_unparseable="error"))


def test_file_data_refuses_synthetic_teacher_contexts(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 1 + 1?", "answer": 2}] * 4)
    with pytest.raises(ValueError, match="only available for the synthetic task"):
        job.load_data(data_args(path, teacher_context="examples"))


def test_too_few_rows_to_hold_out(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 1 + 1?", "answer": 2}] * 2)
    with pytest.raises(ValueError, match="not more than --num_eval 2: pass --eval_dataset_name or lower --num_eval"):
        job.load_data(data_args(path))


def test_a_teacher_prompt_template_and_column_reach_training_and_the_teachers_evaluation(no_accelerator, tmp_path):
    run = job.OPDJob.from_command_line(["--num_train", "4", "--num_eval", "2", "--output_dir", str(tmp_path),
                                        "--teacher_prompt_template", "Reference: {solution}\n\n{prompt}",
                                        "--teacher_prompt_column", "context"])
    run.load_data()
    row = run.test_data[0]
    assert "teacher_prompt" not in run.test_data.column_names
    assert row["context"][-1]["content"] == f"Reference: {row['solution']}\n\n{row['prompt'][-1]['content']}"


def test_a_run_without_a_teacher_context_ends_before_the_models_load(no_accelerator, tmp_path):
    run = job.OPDJob.from_command_line(["--num_train", "4", "--num_eval", "2", "--output_dir", str(tmp_path),
                                        "--teacher_privileged_context", "false"])
    with pytest.raises(ValueError, match="teacher_privileged_context=False with no teacher model"):
        run.load_data()
    assert run.student is None


# ------------------------------------------------------------------------------------------------- any OPD data
def gsm8k_rows(n: int) -> list[dict]:
    """Grade-school math rows in the benchmark's own format (written for these tests): a worked solution with
    calculator annotations and a final '#### n'."""
    rows = []
    for i in range(n):
        boxes, per_box, loose = 3 + i, 12 + 2 * i, 5 + i
        packed, total = boxes * per_box, boxes * per_box + loose
        rows.append({
            "question": f"A shop packs {per_box} pencils in each of {boxes} boxes and sells {loose} loose pencils. "
                        "How many pencils does it sell?",
            "answer": f"The boxes hold {boxes} * {per_box} = <<{boxes}*{per_box}={packed}>>{packed} pencils.\n"
                      f"With the loose ones it sells {packed} + {loose} = <<{packed}+{loose}={total}>>{total} "
                      f"pencils.\n#### {total}"})
    return rows


def smoke_config_without_answer_length(tmp_path) -> str:
    """The smoke preset without its fixed --eval_max_new_tokens, so the job derives the length from the data."""
    text = (job.PRESETS / "smoke.yaml").read_text()
    assert "eval_max_new_tokens: 16\n" in text
    path = tmp_path / "smoke-data-length.yaml"
    path.write_text(text.replace("eval_max_new_tokens: 16\n", ""))
    return str(path)


def test_a_gsm8k_style_file_is_evaluated_at_the_length_its_solutions_call_for(tiny_model_dir, tmp_path, capsys):
    from sparse_opd.tasks import generation_length

    rows = gsm8k_rows(12)
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    flags = smoke(tiny_model_dir, tmp_path / "run", "--dataset_name", path, "--num_eval", "4",
                  "--mask_strategy", "random", "--analyze", "false")
    flags[1] = smoke_config_without_answer_length(tmp_path)
    assert cli_main(["train", *flags]) == 0
    out = capsys.readouterr().out
    # what the teacher is shown: no calculator marks, the '#### n' line as 'Answer: n'
    tokenizer = tiny_tokenizer()
    shown = [re.sub(r"<<[^>]*>>", "", r["answer"]).replace("\n#### ", "\nAnswer: ") for r in rows]
    expected = generation_length(tokenizer, shown, fallback=16)
    annotated = generation_length(tokenizer, [r["answer"] for r in rows], fallback=16)
    assert expected.max_new_tokens not in (annotated.max_new_tokens, 16)
    assert (f"answer length: {expected.max_new_tokens} new tokens: 1.5 x the 95th percentile of 12 reference "
            "solutions") in out
    assert "shown the reference solution (8 of 8 rows have a worked solution" in out  # the training rows
    assert "answers scored by the final number, as the benchmark's users score it, beside the strict 'Answer: <n>'" \
           in out
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"greedy answers, {expected.max_new_tokens} new tokens" in card
    assert "| model | accuracy (final answer) | accuracy in the strict 'Answer: <n>' format | format errors | rows |" \
           in card


def prompt_file(tmp_path, name="prompts.jsonl", rows=None) -> str:
    rows = rows or [{"prompt": f"What is {a} + {b}?"} for a in range(1, 6) for b in range(1, 4)]
    return write_jsonl(tmp_path / name, rows)


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-teacher")
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_a_prompt_only_file_reports_the_divergence_before_and_after(tiny_model_dir, tiny_teacher_dir, tmp_path,
                                                                   capsys):
    run = job.OPDJob.from_command_line(smoke(
        tiny_model_dir, tmp_path / "run", "--dataset_name", prompt_file(tmp_path), "--num_eval", "4",
        "--teacher_model_name_or_path", tiny_teacher_dir, "--mask_strategy", "random", "--analyze", "false",
        "--beta", "0.5"))
    with job.quiet([]):
        assert run.run() == {}  # no answers: nothing is scored
    out = capsys.readouterr().out
    assert "prompts.jsonl: 15 prompts, no reference answers" in out
    assert "evaluation: the data has no reference answers: the job measures the teacher-student divergence" in out
    before, after = run.divergences["student before"], run.divergences["student after"]
    assert before.num_prompts == after.num_prompts == 4 and before.beta == after.beta == 0.5
    assert before.num_tokens <= 4 * 16 and before.mean > 0  # two different models, --max_completion_length 16
    change, se = after.change_from(before)
    assert change == pytest.approx(after.mean - before.mean)
    summary = out[out.index("== summary =="):]
    assert "4 held-out prompts" in summary
    assert f"divergence from the teacher before: generalized JSD (beta=0.5) {before.mean:.4f}" in summary
    assert f"divergence change: {change:+.3g} +/- {se:.2g} nats/token, paired over the same prompts" in summary
    assert "student before:" not in summary and "gain:" not in summary
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"| student after | {after.mean:.4f} +/- {after.stderr:.4f} | 4 |" in card
    assert "generalized JSD (beta=0.5), nats/token" in card


def test_the_divergence_after_training_uses_the_base_weights_as_the_teacher(tiny_model_dir, tmp_path):
    """Without a separate teacher, the divergence after training compares the trained student with its own base
    weights reading the privileged prompt: at a zero delta it equals the divergence before."""
    run = job.OPDJob.from_command_line(smoke(
        tiny_model_dir, tmp_path / "run", "--mask_strategy", "random", "--eval_divergence", "true",
        "--learning_rate", "0", "--num_eval", "3", "--analyze", "false"))
    with job.quiet([]):
        run.run()
    before, after = run.divergences["student before"], run.divergences["student after"]
    assert before.mean > 0  # the privileged prompt makes the base weights a different distribution
    assert after.per_prompt == pytest.approx(before.per_prompt, abs=1e-5)
    assert set(run.results) == {"student before", "teacher", "student after"}  # the answers are scored as well


def test_a_messages_file_trains_with_its_final_assistant_messages_as_references(tiny_model_dir, tmp_path, capsys):
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"{a} + {b} = {a + b}. Answer: {a + b}"}]}
            for a in range(1, 5) for b in range(1, 4)]
    run = job.OPDJob.from_command_line(smoke(
        tiny_model_dir, tmp_path / "run", "--dataset_name", prompt_file(tmp_path, "chat.jsonl", rows),
        "--num_eval", "3", "--mask_strategy", "random", "--analyze", "false"))
    with job.quiet([]):
        results = run.run()
    out = capsys.readouterr().out
    assert "chat.jsonl: 12 prompts with numeric reference answers" in out
    row = run.test_data[0]
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]  # the reference is not in the student's prompt
    a, b = map(int, re.findall(r"\d+", row["prompt"][-1]["content"]))
    assert row["answer"] == str(a + b) and row["solution"] == f"{a} + {b} = {a + b}. Answer: {a + b}"
    assert row["solution"] in row["teacher_prompt"][-1]["content"]
    assert results["student after"].num_examples == 3 and "gain:" in out


def test_a_file_with_no_prompt_column_ends_in_one_line_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(job_models, "load_student", lambda *a, **k: pytest.fail("a model loaded"))
    path = write_jsonl(tmp_path / "texts.jsonl", [{"text": "a b c", "label": 1}] * 4)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *smoke(tiny_model_dir, tmp_path / "o", "--dataset_name", path)])
    assert str(exit_info.value) == (
        f"sparse-opd train: error: {path} has no usable prompt column (columns: ['text', 'label']): give a 'prompt' "
        "column (text, or a list of chat messages) or a 'messages' column (TRL's formats), or pass --prompt_column "
        "NAME; for question/answer data pass --question_column and --answer_column (--verbose for the traceback)")


@pytest.mark.parametrize("flags, message", [
    ([], "and the data has no reference answers to show them; pass --teacher_model_name_or_path, or give the data"),
    (["--metric", "json:dumps", "--teacher_model_name_or_path", "{model}"],
     "--metric json:dumps scores answers against references, but the held-out rows have none"),
])
def test_prompt_data_without_answers_refuses_what_it_cannot_do_before_any_model_loads(flags, message, tiny_model_dir,
                                                                                      tmp_path, monkeypatch):
    monkeypatch.setattr(job_models, "load_student", lambda *a, **k: pytest.fail("a model loaded"))
    flags = [flag.format(model=tiny_model_dir) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", *smoke(tiny_model_dir, tmp_path / "o", "--dataset_name", prompt_file(tmp_path), *flags)])
    assert message in str(exit_info.value) and "\n" not in str(exit_info.value)


def test_the_teacher_shown_only_final_answers_is_warned_before_training(tiny_model_dir, tmp_path, capsys):
    rows = [{"question": f"What is {a} * {b}?", "answer": a * b} for a in range(2, 6) for b in range(2, 5)]
    run = job.OPDJob.from_command_line(smoke(tiny_model_dir, tmp_path / "run", "--dataset_name",
                                             write_jsonl(tmp_path / "answers.jsonl", rows), "--num_eval", "3"))
    with job.quiet([]):
        for step in (run.load_data, run.load_models, run.evaluate_before):
            step()
    out = capsys.readouterr().out
    assert ("warning: the teacher's privileged context holds only final answers (none of 9 rows has a worked "
            "solution)") in out


@pytest.mark.parametrize("kind, rows, metric, scored, divergence", [
    ("numbers", [{"question": "What is 2 + 3?", "answer": 5}], None, True, False),
    ("text", [{"prompt": "Capital of France?", "completion": "Paris"}], None, False, True),
    ("text with a metric", [{"prompt": "Capital of France?", "completion": "Paris"}], "json:dumps", True, False),
    ("no answers", [{"prompt": "Tell me a story."}], None, False, True),
])
def test_the_evaluation_plan_follows_the_data(kind, rows, metric, scored, divergence, tmp_path):
    from sparse_opd.job.evaluation import plan
    from sparse_opd.tasks import prepare_dataset

    args = job.parse_args(["--config", "smoke", "--output_dir", str(tmp_path)] + (["--metric", metric] if metric
                                                                                    else []))
    test = prepare_dataset(Dataset.from_list(rows * 3))
    found = plan(args, test)
    assert (found.scored, found.divergence) == (scored, divergence), found.reason
    if kind == "text":
        assert found.reason == ("evaluation: the reference answers are text and no --metric says how to score them: "
                                "the job measures the teacher-student divergence on the student's own samples (what "
                                "on-policy distillation minimizes) before and after training")
    args = job.parse_args(["--config", "smoke", "--output_dir", str(tmp_path), "--eval_divergence", "true"])
    assert plan(args, prepare_dataset(Dataset.from_list(rows * 3))).divergence


def test_a_metric_named_on_the_command_line_scores_text_answers(tiny_model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_job_metric.py").write_text(
        "CALLS = []\n"
        "def first_word(predictions, references):\n"
        "    CALLS.append(list(references))\n"
        "    return [float(p.split()[:1] == r.split()[:1]) for p, r in zip(predictions, references)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": [{"role": "user", "content": f"Say {w}."}], "completion": f"{w} it is"}
            for w in ("apples", "two", "three", "four", "five", "six", "seven", "eight")]
    run = job.OPDJob.from_command_line(smoke(
        tiny_model_dir, tmp_path / "run", "--dataset_name", prompt_file(tmp_path, "say.jsonl", rows),
        "--num_eval", "3", "--metric", "my_job_metric:first_word"))
    with job.quiet([]):
        for step in (run.load_data, run.load_models, run.evaluate_before):
            step()
    import my_job_metric

    assert my_job_metric.CALLS[0] == list(run.test_data["answer"])  # the text references, as written
    before = run.results["student before"]
    assert before.metric == "my_job_metric:first_word" and before.format_error_rate is None
    assert "answers scored by --metric my_job_metric:first_word" in capsys.readouterr().out
    assert run.divergences == {}


def test_chat_template_options_reach_every_generation_of_the_job(tiny_model_dir, tmp_path, monkeypatch):
    """Qwen3's `enable_thinking` (any --chat_template_kwargs) renders the prompts of the evaluation and of the
    divergence's samples as in training."""
    from sparse_opd.tasks import generation

    seen = []
    original = generation.tokenize_prompts

    def recording(tokenizer, prompts, chat_template_kwargs=None):
        seen.append(chat_template_kwargs)
        return original(tokenizer, prompts, chat_template_kwargs)

    monkeypatch.setattr(generation, "tokenize_prompts", recording)
    monkeypatch.setattr("sparse_opd.tasks.divergence.tokenize_prompts", recording)
    run = job.OPDJob.from_command_line(smoke(
        tiny_model_dir, tmp_path / "run", "--num_eval", "2", "--eval_divergence", "true", "--chat_template_kwargs",
        '{"enable_thinking": false}'))
    with job.quiet([]):
        for step in (run.load_data, run.load_models, run.evaluate_before):
            step()
    assert len(seen) >= 4 and all(kwargs == {"enable_thinking": False} for kwargs in seen)


@pytest.mark.parametrize("flags, message", [
    (["--metric", "accuracy"], "--metric accuracy: no such file or folder, and not 'package.module:function'"),
    (["--metric", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["--metric", "json:nothing_here"], "has no attribute 'nothing_here'"),
    (["--question_column", "q", "--prompt_column", "p"], "--question_column and --prompt_column name two kinds"),
    (["--prompt_column", "p", "--solution_column", "s"], "--solution_column applies to question/answer data"),
    (["--eval_max_new_tokens", "0"], "--eval_max_new_tokens must be >= 1, got 0"),
    (["--on_unparseable", "ignore"], "--on_unparseable must be 'skip' or 'error'"),
])
def test_bad_data_and_evaluation_flags_are_refused_when_parsed(flags, message, no_accelerator):
    with pytest.raises(ValueError) as info:
        job.parse_args(flags)
    assert message in str(info.value)


# ------------------------------------------------------------------------------------------------------ results
def eval_result(correct: list[int], metric: str = "math_accuracy"):
    from sparse_opd.tasks import EvalResult

    return EvalResult(sum(correct) / len(correct), 0.5 if metric == "math_accuracy" else None, len(correct), 0.0,
                      correct=[float(c) for c in correct], strict_accuracy=0.0 if metric == "math_accuracy" else None,
                      metric=metric)


def test_a_fall_beyond_noise_is_said_in_the_summary_and_on_the_card():
    from sparse_opd.job.summary import score_lines
    from sparse_opd.trainer.model_card import _results

    before, after = eval_result([1] * 10 + [0] * 54), eval_result([1] * 2 + [0] * 62)  # -12.5 +/- 4.2 points
    results = {"student before": before, "teacher": eval_result([1] * 20 + [0] * 44), "student after": after}
    lines = score_lines(results)
    hurt = ("Distillation hurt: accuracy fell from 15.6% to 3.1% (-12.5 +/- 4.2 points, paired over 64 rows, beyond 2 "
            "standard errors).")
    assert lines[-2:] == ["gain: -12.5 +/- 4.2 points (paired over the same problems)", hurt]
    card = _results(results, regressions=[hurt])
    assert card.startswith(f"## Results\n\n**{hurt}**")
    assert "| student after | 3.1% +/- 2.2 | 0.0% | 50% | 64 |" in card
    noise = {"student before": eval_result([1] * 3 + [0] * 61), "student after": eval_result([0] * 64)}  # -4.7 +/- 2.7
    assert not any(line.startswith("Distillation") for line in score_lines(noise))


def test_a_users_metric_without_format_rates_shows_dashes_on_the_card():
    from sparse_opd.trainer.model_card import _results

    card = _results({"student before": eval_result([1, 0, 1, 1], "my:exact"),
                     "student after": eval_result([1, 1, 1, 1], "my:exact")})
    assert "| model | my:exact | accuracy in the strict 'Answer: <n>' format | format errors | rows |" in card
    assert "| student before | 0.75 +/- 0.22 | - | - | 4 |" in card


# ------------------------------------------------------------------------------------------------------ output
def test_quiet_hides_library_warnings_but_not_ours_nor_errors_and_verbose_shows_everything():
    transformers_logger = logging.getLogger("transformers.modeling_utils")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with job.quiet(["--max_steps", "1"]):
            warnings.warn_explicit("library advice", UserWarning, "x.py", 1, module="transformers.foo")
            warnings.warn_explicit("library deprecation", FutureWarning, "x.py", 1, module="trl.trainer")
            warnings.warn_explicit("our deprecation", FutureWarning, "x.py", 1, module="sparse_opd.job")
            warnings.warn_explicit("a user's warning", UserWarning, "x.py", 1, module="__main__")
            warnings.warn_explicit("not the library", UserWarning, "x.py", 1, module="torchvision_like")
            assert transformers_logger.isEnabledFor(logging.ERROR)
            assert not transformers_logger.isEnabledFor(logging.WARNING)
        assert [str(w.message) for w in seen] == ["our deprecation", "a user's warning", "not the library"]
        assert transformers_logger.isEnabledFor(logging.WARNING)
        seen.clear()
        with job.quiet(["--verbose"]):
            warnings.warn_explicit("library advice", UserWarning, "x.py", 1, module="transformers.foo")
        assert [str(w.message) for w in seen] == ["library advice"]
    assert job.quiet(["--verbose", "false"]).verbose is False and job.quiet(["--verbose"]).verbose is True


def test_quiet_lets_an_error_through_and_restores_the_logs():
    transformers_logger = logging.getLogger("transformers.modeling_utils")
    with pytest.raises(RuntimeError, match="real errors still raise"), job.quiet([]):
        raise RuntimeError("real errors still raise")
    assert transformers_logger.isEnabledFor(logging.WARNING)


def test_the_embedded_model_is_named_by_its_upstream_checkpoint(tiny_model_dir, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from sparse_opd import SparseDeltaConfig
    from sparse_opd.embedded import EMBEDDED_NOTE, UPSTREAM_MODEL_ID, is_embedded, mark_embedded

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    mark_embedded(model)
    assert is_embedded(model) and "dequantized from the Q4_1 GGUF" in EMBEDDED_NOTE
    peft_model = get_peft_model(model, SparseDeltaConfig(mask_density=0.1))
    assert peft_model.peft_config["default"].base_model_name_or_path == UPSTREAM_MODEL_ID
    peft_model.save_pretrained(tmp_path / "adapter")  # the tuner's own card, outside the trainer, says it too
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "load_embedded_model" in card and "dequantized from the Q4_1 GGUF" in card


def test_the_card_of_an_embedded_run_says_how_to_load_its_base(tiny_model_dir, tmp_path, monkeypatch):
    from sparse_opd import embedded

    monkeypatch.setattr(embedded, "resolve_model_path", lambda name: tiny_model_dir if name == "embedded" else name)
    out_dir = tmp_path / "run"
    with job.quiet([]):
        job.OPDJob.from_command_line(smoke("embedded", out_dir, "--analyze", "false")).run()
    card = (out_dir / "README.md").read_text()
    adapter_config = json.loads((out_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "load_embedded_model" in card and "dequantized from the Q4_1 GGUF" in card
    assert tiny_model_dir not in card and tiny_model_dir not in json.dumps(adapter_config)


@pytest.mark.slow
@pytest.mark.parametrize("config, kind", [
    ("fsdp2.yaml", "DDP (accelerate runs an FSDP config as DDP on the CPU)"),  # FSDP2 itself where there are GPUs
    ("zero3.yaml", "DeepSpeed ZeRO-3")])
def test_the_example_under_accelerate_launch_with_the_shipped_configs(config, kind, tiny_model_dir, tmp_path):
    """What the docs tell a user to run: `accelerate launch --config_file examples/accelerate_configs/... ` on 2
    processes (gloo on this CPU)."""
    import os
    import subprocess
    import sys

    if config == "zero3.yaml":
        pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(EXAMPLE.parent / "accelerate_configs" / config), str(EXAMPLE),
           *smoke(tiny_model_dir, out, "--mask_strategy", "near_zero", "--analyze", "false",
                  "--eval_divergence", "true")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"training: 2 processes, {kind}, fp32" in result.stdout
    assert "device: cpu (--config smoke)" in result.stdout
    assert result.stdout.count("== summary ==") == 1  # printed by the main process only
    # the divergence before and after, measured with the models gathered (ZeRO-3) and the base weights as the teacher
    assert result.stdout.count("divergence change: ") == 2  # after training and in the summary
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
