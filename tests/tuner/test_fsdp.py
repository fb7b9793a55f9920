"""FSDP2 (`fully_shard`) over a sparse delta, 2 processes under gloo on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from tests.helpers import HELPERS


def test_fsdp2_trains_and_keeps_the_gathered_values_identical(tmp_path):
    worker = HELPERS / "fsdp_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(worker), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for losses in (rank0["losses"], rank1["losses"]):
        assert losses[-1] < losses[0]
    assert rank0["values"].keys() == rank1["values"].keys() and len(rank0["values"]) == 14
    for key, value in rank0["values"].items():
        assert torch.equal(value, rank1["values"][key]), key
        assert value.abs().sum() > 0
