"""Every CLI error is one line on stderr naming the problem, with exit status 2; never a traceback or a Hub lookup."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from peft import get_peft_model

from sparse_opd import SparseDeltaConfig
from sparse_opd.cli import main
from sparse_opd.masks import random_mask
from tests.helpers import ROOT
from tests.helpers.tiny_models import make_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = make_model("llama")
    model.save_pretrained(root / "base")
    mask = random_mask(model, density=0.1)
    mask.save(root / "mask.safetensors")
    get_peft_model(model, SparseDeltaConfig(mask=mask, init_weights=False)).save_pretrained(root / "adapter")
    (root / "notes.txt").write_text("not a checkpoint")
    os.mkfifo(root / "fifo")
    (root / "report").mkdir()
    (root / "report" / "report.json").write_text("{}")
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
    assert line.startswith(("sparse-opd", "usage")) or "error:" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(files, tmp_path, capsys):
    line = _error(["analyze", str(files / "base"), str(files / "adapter"), "--out", str(tmp_path), "--device",
                   "cuda"], capsys)
    assert "no CUDA GPU" in line and "--device cpu" in line


# ---------------------------------------------------------------------------------- outputs (issue 21.12)
LONG = "m" * 300 + ".safetensors"
COMBINE = ["mask", "combine", "{mask}", "{mask}", "--out"]


@pytest.fixture(scope="module")
def device(files):
    """A character device to name as an output. As root, a node like /dev/null's made in the test's directory: were
    the check to regress, a save would replace that node, not the real /dev/null. Otherwise /dev/null itself, which a
    process without root cannot replace."""
    if os.geteuid() != 0:
        return "/dev/null"
    path = files / "null"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except OSError:
        pytest.skip("root without CAP_MKNOD: no device node that a regression could safely replace")
    return str(path)


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([*COMBINE, "{dev}"], "--out {dev} is a character device, not a regular file; it is never written over"),
        ([*COMBINE, "{fifo}"], "--out {fifo} is a FIFO, not a regular file"),
        ([*COMBINE, "{tmp}"], "--out {tmp} is a directory; name a file to write"),
        ([*COMBINE, "{tmp}/missing/m.safetensors"], "the directory {tmp}/missing does not exist; create it first"),
        ([*COMBINE, "{tmp}/" + LONG], "is 312 bytes, longer than the 255 this file system allows"),
        (["mask", "diff", "{base}", "{base}", "--out", "{dev}"], "--out {dev} is a character device"),
        (["mask", "diff", "{base}", "{base}", "--out", "{tmp}/m.safetensors", "--json", "{tmp}"],
         "--json {tmp} is a directory"),
        (["mask", "prior", "{base}", "--density", "0.1", "--out", "{dev}"], "--out {dev} is a character device"),
        (["mask", "stats", "{mask}", "--json", "{fifo}"], "--json {fifo} is a FIFO"),
        (["overlap", "{mask}", "{mask}", "--json", "{tmp}"], "--json {tmp} is a directory; name a file to write"),
        (["analyze", "{base}", "{adapter}", "--out", "{notes}"], "--out {notes} is a regular file, not a directory"),
        (["analyze", "{base}", "{adapter}", "--out", "{dev}"], "--out {dev} is a character device, not a dir"),
        (["analyze", "{base}", "{adapter}", "--out", "{tmp}/" + "r" * 300], "longer than the 255"),
        (["compare", "{report}/report.json", "--out", "{dev}"], "--out {dev} is a character device"),
    ],
)
def test_outputs_that_cannot_or_must_not_be_written_are_refused_before_any_work(files, device, tmp_path, capsys,
                                                                                 argv, expected):
    paths = {"base": files / "base", "adapter": files / "adapter", "mask": files / "mask.safetensors",
             "notes": files / "notes.txt", "fifo": files / "fifo", "report": files / "report", "tmp": tmp_path,
             "dev": device}
    line = _error([a.format(**paths) for a in argv], capsys)
    assert expected.format(**paths) in line, line
    assert stat.S_ISCHR(os.stat(device).st_mode) and stat.S_ISFIFO(os.stat(files / "fifo").st_mode)
    assert (files / "notes.txt").read_text() == "not a checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_an_unwritable_directory_is_named(files, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:  # root may write anywhere: the permission check must still name the directory
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != str(locked) and real(path, mode))
    try:
        line = _error(["mask", "combine", str(files / "mask.safetensors"), str(files / "mask.safetensors"), "--out",
                       str(locked / "m.safetensors")], capsys)
        assert f"the directory {locked} is not writable" in line
        line = _error(["analyze", str(files / "base"), str(files / "adapter"), "--out", str(locked)], capsys)
        assert f"--out {locked} is a directory that is not writable" in line
    finally:
        locked.chmod(0o700)


# ----------------------------------------------------------------------------------- inputs (issue 21.12)
@pytest.mark.parametrize(
    "argv, expected",
    [
        (["mask", "stats", "{fifo}"], "mask file {fifo} is a FIFO, not a file"),
        (["mask", "stats", "/dev/zero"], "mask file /dev/zero is a character device, not a file"),
        (["mask", "combine", "{mask}", "/dev/zero", "--out", "{tmp}/m.safetensors"],
         "/dev/zero is a character device"),
        (["mask", "prior", "/dev/zero", "--density", "0.1", "--out", "{tmp}/m.safetensors"],
         "model /dev/zero is a character device, not a directory or a Hub id"),
        (["mask", "prior", "{notes}", "--density", "0.1", "--out", "{tmp}/m.safetensors"],
         "model {notes} is a regular file, not a directory or a Hub id"),
        (["mask", "diff", "{fifo}", "{base}", "--out", "{tmp}/m.safetensors"], "base checkpoint {fifo} is a FIFO"),
        (["analyze", "/dev/zero", "{adapter}", "--out", "{tmp}/r"], "base checkpoint /dev/zero is a character device"),
        (["overlap", "{fifo}", "{mask}"], "mask file {fifo} is a FIFO, not a file"),
        (["overlap", "{adapter}", "{fifo}", "--base", "{base}"], "{fifo} is a FIFO, not a file or a directory"),
        (["compare", "{fifo}"], "report {fifo} is a FIFO, not a file"),
        (["mask", "stats", "{tmp}/gone.safetensors"], "mask file {tmp}/gone.safetensors does not exist"),
    ],
)
def test_inputs_are_reported_as_what_they_are(files, tmp_path, capsys, argv, expected):
    paths = {"base": files / "base", "adapter": files / "adapter", "mask": files / "mask.safetensors",
             "notes": files / "notes.txt", "fifo": files / "fifo", "tmp": tmp_path}
    line = _error([a.format(**paths) for a in argv], capsys)  # a FIFO opened for reading would hang here
    assert expected.format(**paths) in line, line


# --------------------------------------------------------------------------- removed spellings (issue 23.4)
@pytest.mark.parametrize("argv", [
    ["mask", "overlap", "{mask}", "{mask}"],
    ["mask", "diff", "{base}", "{base}", "--out", "{tmp}/m.safetensors", "--report", "{tmp}/r.json"],
    ["overlap", "{base}", "{adapter}", "{adapter}"],
])
def test_the_old_spellings_are_gone(files, tmp_path, capsys, argv):
    paths = {"base": files / "base", "adapter": files / "adapter", "mask": files / "mask.safetensors", "tmp": tmp_path}
    line = _error([a.format(**paths) for a in argv], capsys)
    assert "invalid choice: 'overlap'" in line or "unrecognized arguments" in line, line
    assert not (tmp_path / "m.safetensors").exists()


def test_no_library_package_imports_the_cli():
    import re

    root = ROOT / "sparse_opd"
    for package in ("masks", "analysis", "tuner", "trainer", "tasks", "job"):
        for path in (root / package).rglob("*.py"):
            assert not re.search(r"(from|import) +(sparse_opd\.cli|\.+cli\b)", path.read_text()), path
