"""A 2-process DDP run (gloo, on the CPU) of SparseOPDTrainer ends with the same mask and values on both ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import with_root_on_path

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    import torch.distributed as dist
    from sparse_opd.tasks import arithmetic_dataset
    from sparse_opd.trainer import SparseOPDConfig, SparseOPDTrainer, sparse_delta_layers
    from tests.helpers.tiny_opd import tiny_llama, tiny_tokenizer

    out = sys.argv[1]
    tokenizer = tiny_tokenizer()
    args = SparseOPDConfig(
        output_dir=out, mask_strategy="random", mask_density=0.2, per_device_train_batch_size=2, max_steps=3,
        max_completion_length=6, learning_rate=2e-2, use_cpu=True, bf16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", logging_steps=1, seed=0,
    )
    trainer = SparseOPDTrainer(
        model=tiny_llama(tokenizer), train_dataset=arithmetic_dataset("train", 16, 1), args=args,
        processing_class=tokenizer,
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    layers = sparse_delta_layers(trainer.model, "default")
    state = {n: (m.sparse_delta_indices["default"].clone(), m.sparse_delta_values["default"].detach().clone())
             for n, m in layers.items()}
    torch.save({"world": trainer.accelerator.num_processes, "state": state,
                "prompts_seen": trainer.state.num_input_tokens_seen}, f"{out}/rank{rank}.pt")
    """
)


@pytest.mark.slow
def test_two_process_ddp_keeps_masks_and_values_identical(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = with_root_on_path(dict(os.environ))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(script),
        str(tmp_path),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    assert state0.keys() == state1.keys() and state0
    moved = 0
    for name in state0:
        assert torch.equal(state0[name][0], state1[name][0]), f"{name}: masks differ between ranks"
        assert torch.equal(state0[name][1], state1[name][1]), f"{name}: values differ between ranks"
        moved += int((state0[name][1] != 0).sum())
    assert moved > 0, "training moved no value"
