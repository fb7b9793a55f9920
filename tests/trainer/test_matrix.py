"""SparseOPDTrainer where OPD users run it: {fp32, bf16} x {one process, DDP, FSDP2, DeepSpeed ZeRO-3} x {base-weights
teacher with the privileged context, separate teacher} x {mask file, probe, near-zero prior}, pruned to fit CI, with
2 processes under gloo on the CPU for the distributed cells (tests/helpers/opd_matrix_worker.py runs them), plus
variants: a GPT-2 student as it ships (absolute positions, 0.1 dropout) on left-padded mixed-length batches, and
rollouts from TRL's vLLM server path under ZeRO-3 (a stand-in server that samples the student only through the weight
sync).

Every cell checks: finite losses and a lower divergence on a fixed batch after training; only masked coordinates
move; both ranks hold identical masks, values and logits; the saved adapter reloads onto the plain base with the
same logits; two teacher passes agree (eval mode); in fp32 the teacher's states over a padded batch equal each row's
unpadded forward; the log-probabilities of the sampled tokens under the generation path agree with the training
forward (fp32: to rounding, 1e-5; bf16: within 2^-6 of the largest logit, a heuristic bound, see docs/trainer.md).
Resume from a checkpoint continues bit-identically in every distribution.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import HELPERS

pytest.importorskip("deepspeed")

WORKER = HELPERS / "opd_matrix_worker.py"
STEPS = 4  # opd_matrix_worker.STEPS
LAUNCHES = {  # distribution -> cells (dtype-teacher-mask[+variant...], see opd_matrix_worker.py)
    "single": ["fp32-base-file", "fp32-base-probe", "fp32-separate-near_zero", "bf16-separate-file",
               "fp32-base-file+resume", "fp32-base-near_zero+gpt2", "fp32-base-gradient"],
    "ddp": ["fp32-base-probe", "fp32-separate-file", "bf16-base-near_zero", "fp32-separate-file+resume",
            "fp32-separate-gradient"],
    "fsdp2": ["fp32-base-near_zero", "fp32-separate-file", "bf16-base-file", "fp32-separate-file+resume",
              "fp32-base-gradient", "bf16-separate-gradient"],
    "zero3": ["fp32-base-near_zero", "fp32-separate-file", "bf16-separate-near_zero", "fp32-separate-file+resume",
              "fp32-separate-file+vllm", "fp32-separate-gradient", "bf16-base-gradient", "fp32-base-gradient+resume"],
}
CELLS = [(dist, cell) for dist, cells in LAUNCHES.items() for cell in cells]


def _prepare(root: Path) -> None:
    from sparse_opd.masks import random_mask
    from tests.helpers.tiny_opd import peaked_teacher, student_model, tiny_gpt2, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    student = student_model(tokenizer)  # peaked next-token distributions
    student.save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "student")
    teacher = peaked_teacher(tokenizer)  # the student with its block weights perturbed
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    random_mask(student, density=0.2, seed=3).save(root / "mask.safetensors")
    gpt2 = tiny_gpt2(tokenizer, dropout=0.1)  # as GPT-2 ships: dropout live in train mode, tied embeddings
    gpt2.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")


def _launch(root: Path, dist: str, cells: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}  # the worker puts the root on its path
    if dist == "single":
        cmd = [sys.executable, str(WORKER), str(root), dist, *cells]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(WORKER), str(root), dist, *cells]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, f"{dist} launch failed:\n{stderr[-6000:]}"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    _prepare(root)
    for dist, cells in LAUNCHES.items():
        _launch(root, dist, cells)
    return root


def _ranks(root: Path, dist: str, cell: str) -> list[dict]:
    files = sorted((root / dist / cell).glob("rank*.pt"))
    assert len(files) == (1 if dist == "single" else 2), files
    return [torch.load(f, weights_only=False) for f in files]


def _base_model(root: Path, dtype: str, variants: set[str] = frozenset()):
    from transformers import AutoModelForCausalLM

    student = root / ("gpt2" if "gpt2" in variants else "student")
    return AutoModelForCausalLM.from_pretrained(student, dtype=getattr(torch, dtype))


@pytest.mark.parametrize("dist, cell", CELLS, ids=[f"{d}-{c}" for d, c in CELLS])
def test_cell(matrix, dist, cell):
    check_cell(matrix, dist, cell)


def check_cell(root: Path, dist: str, cell: str) -> None:
    """Every property of one cell, from what each rank wrote (also used by benchmarks/gpu_check.py)."""
    from tests.helpers.opd_matrix_worker import parse_cell

    ranks = _ranks(root, dist, cell)
    dtype, _, _, variants = parse_cell(cell)
    if "resume" in variants:
        for result in ranks:
            for name, values in result["straight"].items():
                assert torch.equal(values, result["resumed"][name]), f"{name}: resuming changed the values"
        return
    dtype = "bfloat16" if dtype == "bf16" else "float32"
    first = ranks[0]
    losses = [h["loss"] for h in first["log"]]
    assert losses and all(math.isfinite(x) for x in losses)
    assert first["divergence_after"] < first["divergence_before"], (first["divergence_before"],
                                                                    first["divergence_after"])
    assert all(r["teacher_deterministic"] for r in ranks), "two teacher passes differ"
    for other in ranks[1:]:  # every rank holds the same adapter
        assert other["mask"] == first["mask"]
        for name, values in first["values"].items():
            assert torch.equal(values, other["values"][name]), f"{name}: values differ between ranks"
        assert torch.equal(other["logits"], first["logits"])
    _only_masked_coordinates_moved(root, first, dtype, variants)
    _reloads_with_the_same_logits(root, dist, cell, first, dtype, variants)
    _rollouts_match_the_training_forward(first, dtype)
    if dtype == "float32":  # the teacher scores every row at its own positions, whatever the padding
        for result in ranks:
            assert result["teacher_vs_unpadded"] <= 1e-5, f"teacher states move with padding: {result}"
    if "gpt2" in variants:
        assert len(set(first["prompt_lengths"])) > 1, "the GPT-2 cell should have left-padded micro-batches"
    if "vllm" in variants:
        _the_server_received_the_policy(first)
    if parse_cell(cell)[2] == "gradient":
        _discovery_sharded_its_statistics(ranks, first)


def _discovery_sharded_its_statistics(ranks, first):
    """Gradient discovery ran, kept 8 B per adapted entry divided by the ranks, and moved the adapter off its
    provisional (evenly spaced) coordinates onto the same mask on every rank (checked above)."""
    for result in ranks:
        report = result["discovery"]
        assert report is not None and report["micro_batches"] == 2 and report["tokens"] > 0, report
        assert report["accumulator_bytes_per_entry"] == pytest.approx(8 / len(ranks), rel=1e-3), report
    from sparse_opd.trainer.discovery import provisional_indices

    for name, indices in first["indices"].items():
        shape = tuple(first["merged"][name.removeprefix("base_model.model.") + ".weight"].shape)
        provisional = provisional_indices({name: indices.numel()}, {name: shape})[name]
        assert not torch.equal(indices, provisional), f"{name}: still on its provisional coordinates"


def _only_masked_coordinates_moved(root, result, dtype, variants):
    initial = _base_model(root, dtype, variants).state_dict()
    moved = 0
    for name, merged in result["merged"].items():
        before = initial[name].float()
        changed = torch.nonzero((merged != before).reshape(-1)).flatten()
        module = name.removesuffix(".weight")
        allowed = set(result["indices"].get(f"base_model.model.{module}", torch.tensor([])).tolist())
        assert set(changed.tolist()) <= allowed, f"{name}: entries outside the mask moved"
        moved += changed.numel()
    assert moved > 0, "training moved nothing"


def _reloads_with_the_same_logits(root, dist, cell, result, dtype, variants):
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(_base_model(root, dtype, variants), root / dist / cell / "adapter").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=torch.tensor([[1, 5, 9, 14, 3, 7]])).logits.float()
    # bf16: FSDP2's mixed precision keeps float32 masters and computes in bf16, a plain bf16 model rounds elsewhere:
    # the same function to within a bf16 rounding step of the largest logit
    tolerance = 1e-5 if dtype == "float32" else 2.0**-7 * float(result["logits"].abs().max())
    torch.testing.assert_close(logits, result["logits"], rtol=0, atol=tolerance)


def _rollouts_match_the_training_forward(result, dtype):
    gaps = [h["rollout/logp_abs_diff_max"] for h in result["log"] if "rollout/logp_abs_diff_max" in h]
    assert gaps, "the rollout/training mismatch was not logged"
    bound = 1e-5 if dtype == "float32" else 2.0**-6 * float(result["logits"].abs().max())
    assert max(gaps) <= bound, f"sampled-token log-probabilities differ by {max(gaps):.3g} > {bound:.3g}"


def _the_server_received_the_policy(result):
    """The stand-in vLLM server started from other weights (the teacher's); the rollout check above shows it sampled
    the student at every step, so every sync arrived. Here: the first sync sent the whole model, later ones only the
    adapted weights, once per optimizer step (plus the probe's generation before training)."""
    synced, sent = result["vllm"]["synced"], result["vllm"]["sync_bytes"]
    adapted = {name.removeprefix("base_model.model.") + ".weight" for name in result["indices"]}
    assert len(synced) == len(sent) == STEPS, (len(synced), len(sent))
    assert synced[0] == set(result["merged"]), "the first sync sends every weight"
    assert all(names == adapted for names in synced[1:]), "later syncs send only the adapted weights"
    assert all(b < sent[0] for b in sent[1:])
