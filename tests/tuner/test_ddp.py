"""Real 2-process DDP (gloo) on the CPU: ranks end with identical indices and values."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from tests.helpers import HELPERS


def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    worker = HELPERS / "ddp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(worker), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    values = [v for k, v in rank0.items() if "sparse_delta_values" in k]
    assert all(v.abs().sum() > 0 for v in values), "training did not move the values"
