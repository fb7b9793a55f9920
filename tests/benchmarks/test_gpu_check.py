"""benchmarks/gpu_check.py cannot rot: its --dry-run runs every step on this CPU with tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_the_gpu_check_runs_every_step_in_its_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, timeout=300, env=env, check=False)
    results = json.loads(out.read_text()) if out.exists() else {}
    failed = {k: v.get("error") for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False}
    assert proc.returncode == 0 and results["ok"], f"{failed or proc.stderr[-3000:]}"
    assert results["mode"] == "dry-run"
    assert results["job"]["adapter_saved"] and "student after" in results["job"]
    (cell,) = results["matrix_bf16"]["cells"].values()
    assert cell["passed"] and cell["gap_max"] <= cell["bound"]
    assert set(results["generation"]["tokens_per_s"]) == {"base", "sparse_delta"}
    assert all(v > 0 for v in results["generation"]["tokens_per_s"].values())
    gaps = results["rollout_gap"]
    assert gaps["float32"]["max"] <= 1e-5, "fp32 rollouts are sampled from the trained policy to rounding"
    assert 0 < gaps["bfloat16"]["max"] < 1.0 and gaps["bfloat16"]["heuristic_bound_2^-6_max_logit"] > 0
