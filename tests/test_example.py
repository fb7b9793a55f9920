"""examples/opd_math.py end to end on a tiny model saved to disk (the default embedded model is for the real run)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from test_trainer_support import tiny_llama, tiny_tokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "opd_math.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("opd_math", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["opd_math"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("opd_math", None)


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


def test_presets_are_defaults_that_flags_override(example):
    script, config = example.parse_args(["--output_dir", "x"])
    assert config.max_steps == example.PRESETS["cpu"]["max_steps"] and config.mask_strategy == "near_zero"
    assert (script.num_eval, script.eval_max_new_tokens) == example.EVAL_PRESETS["cpu"]
    script, config = example.parse_args(["--preset", "smoke", "--max_steps", "5", "--mask_density", "0.02"])
    assert config.max_steps == 5 and config.mask_density == 0.02
    assert config.per_device_train_batch_size == example.PRESETS["smoke"]["per_device_train_batch_size"]
    with pytest.raises(SystemExit):
        example.parse_args(["--preset", "huge"])


def _run(example, argv, capsys):
    example.main(argv)
    return capsys.readouterr().out


def test_example_runs_and_reports_on_a_tiny_model(example, tiny_model_dir, tmp_path, capsys):
    out = _run(
        example,
        [
            "--preset",
            "smoke",
            "--model",
            tiny_model_dir,
            "--output_dir",
            str(tmp_path / "run"),
            "--mask_density",
            "0.1",
            "--num_train",
            "16",
        ],
        capsys,
    )
    for line in (
        "student before:",
        "teacher:",
        "student after:",
        "trained coordinates:",
        "adapter:",
        "learned delta:",
        "relative change ||delta||_F / ||W||_F: ffn ",
        "analyzer (sparse-opd analyze BASE ADAPTER",
        "FFN share of update energy:",
    ):
        assert line in out, line
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert f"adapter: {tmp_path / 'run' / 'adapter_model.safetensors'}" in out
    assert "mask: near_zero" in out


def test_example_trains_on_a_local_question_answer_dataset(example, tiny_model_dir, tmp_path, capsys):
    rows = [
        {"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
        for a in range(1, 5)
        for b in range(1, 4)
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = _run(
        example,
        [
            "--preset",
            "smoke",
            "--model",
            tiny_model_dir,
            "--output_dir",
            str(tmp_path / "run"),
            "--dataset",
            str(data),
            "--num_eval",
            "4",
        ],
        capsys,
    )
    assert "held-out problems" in out and "student after:" in out


def test_example_with_a_separate_teacher_model(example, tiny_model_dir, tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer, seed=1).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    out = _run(
        example,
        [
            "--preset",
            "smoke",
            "--model",
            tiny_model_dir,
            "--teacher",
            str(teacher_dir),
            "--output_dir",
            str(tmp_path / "run"),
            "--mask_strategy",
            "random",
        ],
        capsys,
    )
    assert f"teacher: {teacher_dir}" in out and "mask: random" in out
