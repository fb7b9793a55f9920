"""The main job: `examples/opd_math.py` and `sparse-opd train` end to end on a tiny model saved to disk (the default
embedded model is for the real run), its flags and presets, a user's data of every kind, and quiet output."""

from __future__ import annotations

import importlib.util
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from test_trainer_support import tiny_llama, tiny_tokenizer

from sparse_opd import job
from sparse_opd.cli import main as cli_main

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
def test_the_cpu_preset_is_the_default_and_flags_override_it():
    args, config = job.parse_args(["--output_dir", "x"])
    assert config.mask_strategy == "probe" and config.max_steps == 24 and config.use_cpu and not config.bf16
    assert args.model_name_or_path == "embedded" and args.num_eval == 64 and config.output_dir == "x"
    args, config = job.parse_args(["--config", "smoke", "--max_steps", "5", "--mask_density", "0.02"])
    assert config.max_steps == 5 and config.mask_density == 0.02 and config.mask_probe_steps == 1
    assert args.num_eval == 8


def test_a_users_yaml_file_is_a_config_too(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("max_steps: 3\nmask_strategy: random\nnum_eval: 5\nuse_cpu: true\n")
    args, config = job.parse_args(["--config", str(path), "--num_eval", "6"])
    assert config.max_steps == 3 and config.mask_strategy == "random" and args.num_eval == 6


def test_unknown_preset_names_the_presets():
    with pytest.raises(SystemExit, match="not a preset .*cpu.*gpu.*smoke"):
        job.parse_args(["--config", "huge"])


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: sparse-opd train")
    for flag, default in [("--model_name_or_path", "embedded"), ("--mask_strategy", "probe"), ("--max_steps", "24"),
                          ("--teacher_model_name_or_path", "None"), ("--dataset_name", "None"), ("--config", "cpu")]:
        assert flag in out
        section = out[out.index(f"  {flag} "):]
        assert f"(default: {default})" in " ".join(section[:900].split()), flag


def test_the_presets_ship_with_the_package():
    assert {p.stem for p in job.PRESETS.glob("*.yaml")} == {"cpu", "smoke", "gpu"}
    import tomllib

    pyproject = tomllib.loads((EXAMPLE.parents[1] / "pyproject.toml").read_text())
    assert "presets/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["sparse_opd"]


# ------------------------------------------------------------------------------------------------------ runs
def test_example_discovers_trains_and_reports(example, tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "run"
    example.main(smoke(tiny_model_dir, out_dir))
    out = capsys.readouterr().out
    for line in ("student before:", "teacher:", "student after:", "gain:", "trained coordinates:", "(mask: probe)",
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


def test_a_separate_teacher_sees_the_students_prompt(tiny_model_dir, tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, seed=1).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    cli_main(["train", *smoke(tiny_model_dir, tmp_path / "run", "--teacher_model_name_or_path", str(teacher_dir),
                              "--mask_strategy", "random", "--analyze", "false")])
    out = capsys.readouterr().out
    assert f"teacher: {teacher_dir}, shown the student's own prompt" in out and "(mask: random)" in out


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


# ------------------------------------------------------------------------------------------------------ output
def test_quiet_hides_library_warnings_but_not_errors_and_verbose_shows_everything():
    transformers_logger = logging.getLogger("transformers.modeling_utils")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with job.quiet(["--max_steps", "1"]):
            warnings.warn_explicit("library advice", UserWarning, "x.py", 1, module="transformers.foo")
            warnings.warn("deprecated", FutureWarning)
            with pytest.raises(RuntimeError):
                raise RuntimeError("real errors still raise")
            assert transformers_logger.isEnabledFor(logging.ERROR)
            assert not transformers_logger.isEnabledFor(logging.WARNING)
        assert not seen
        assert transformers_logger.isEnabledFor(logging.WARNING)
        with job.quiet(["--verbose"]):
            warnings.warn_explicit("library advice", UserWarning, "x.py", 1, module="transformers.foo")
        assert [str(w.message) for w in seen] == ["library advice"]
    assert job.quiet(["--verbose", "false"]).verbose is False and job.quiet(["--verbose"]).verbose is True


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
    args, config = job.parse_args(smoke("embedded", out_dir, "--analyze", "false"))
    with job.quiet([]):
        job.run(args, config)
    card = (out_dir / "README.md").read_text()
    adapter_config = json.loads((out_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "load_embedded_model" in card and "dequantized from the Q4_1 GGUF" in card
    assert tiny_model_dir not in card and tiny_model_dir not in json.dumps(adapter_config)


@pytest.mark.slow
@pytest.mark.parametrize("config, kind", [("fsdp2.yaml", "FSDP2"), ("zero3.yaml", "DeepSpeed ZeRO-3")])
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
    assert result.stdout.count("== summary ==") == 1  # printed by the main process only
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
