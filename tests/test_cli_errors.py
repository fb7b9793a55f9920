"""Every CLI error is one line on stderr naming the problem, with exit status 2; never a traceback or a Hub lookup."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import make_model

from sparse_opd import SparseDeltaConfig
from sparse_opd.cli import main
from sparse_opd.masks import random_mask


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_model("llama")
    model.save_pretrained(root / "base")
    mask = random_mask(model, density=0.1)
    mask.save(root / "mask.safetensors")
    get_peft_model(model, SparseDeltaConfig(mask=mask, init_weights=False)).save_pretrained(root / "adapter")
    (root / "notes.txt").write_text("not a checkpoint")
    return root


def _error(argv, capsys) -> str:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["analyze", "{mask}", "{adapter}", "--out", "{out}"], "mask file, not a model checkpoint"),
        (["analyze", "{base}", "{notes}", "--out", "{out}"], "{notes}"),
        (["analyze", "outputs/missing-run", "{adapter}", "--out", "{out}"], "outputs/missing-run"),
        (["analyze", "./missing", "{adapter}", "--out", "{out}"], "does not exist"),
        (["analyze", "{base}", "{adapter}", "--out", "{out}", "--rank-fraction", "0"], "--rank-fraction"),
        (["analyze", "{base}", "{adapter}", "--out", "{out}", "--rank-fraction", "-1"], "--rank-fraction"),
        (["mask", "diff", "{base}", "{adapter}", "--out", "{out}/m", "--threshold", "-1"], "--threshold"),
        (["mask", "stats", "{notes}"], "{notes}"),
        (["mask", "stats", "{adapter}/adapter_model.safetensors"], "not a sparse_opd mask file"),
        (["overlap", "{mask}", "{notes}"], "{notes}"),
        (["compare", "{base}/config.json"], "not a report.json"),
    ],
)
def test_cli_errors_are_one_line(files, tmp_path, capsys, argv, expected):
    paths = {"base": files / "base", "adapter": files / "adapter", "mask": files / "mask.safetensors",
             "notes": files / "notes.txt", "out": tmp_path / "out"}
    line = _error([a.format(**paths) for a in argv], capsys)
    assert expected.format(**paths) in line, line
    assert line.startswith("sparse-opd") or line.startswith("usage") or "error:" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(files, tmp_path, capsys):
    line = _error(["analyze", str(files / "base"), str(files / "adapter"), "--out", str(tmp_path), "--device",
                   "cuda"], capsys)
    assert "no CUDA GPU" in line and "--device cpu" in line
