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
from test_trainer_support import tiny_llama, tiny_tokenizer

from sparse_opd import job
from sparse_opd.cli import main as cli_main
from sparse_opd.job import arguments
from sparse_opd.job import models as job_models
from sparse_opd.job.models import describe_device

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "opd_math.py"


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


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    assert str(exit_info.value) == (f"sparse-opd train: error: --mask_path {tmp_path / 'm.safetensors'} does not exist "
                                    "(--verbose for the traceback)")


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
    assert cli_main(["train", *smoke(tiny_model_dir, tmp_path / "run", "--teacher_model_name_or_path", str(teacher_dir),
                                     "--teacher_model_revision", "main", "--teacher_model_init_kwargs",
                                     '{"dtype": "float32"}', "--mask_strategy", "random", "--analyze", "false")]) == 0
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
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "What is 1 + 1?", "answer": 2}] * 4)
    with pytest.raises(ValueError, match=r"has no column 'question' \(columns: \['prompt', 'answer'\]\); pass the "
                                         r"right --question_column"):
        job.load_data(data_args(path))


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
    with pytest.raises(ValueError, match=r"2 of 6 rows have an answer with no number \(row \d: .*\); answers must be"):
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
           *smoke(tiny_model_dir, out, "--mask_strategy", "near_zero", "--analyze", "false")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"training: 2 processes, {kind}, fp32" in result.stdout
    assert "device: cpu (--config smoke)" in result.stdout
    assert result.stdout.count("== summary ==") == 1  # printed by the main process only
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
