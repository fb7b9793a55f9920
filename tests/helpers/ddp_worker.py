"""Run by tests/tuner/test_ddp.py under `torchrun --nproc_per_node 2`: a few DDP steps on a sparse delta."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.helpers
from sparse_opd import SparseDeltaConfig
from tests.helpers.tiny_models import VOCAB, make_model


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model = make_model("llama", seed=0)
    # every rank draws the same mask from the same seed; data differs per rank, so values stay equal only if
    # DDP averages the value gradients
    config = SparseDeltaConfig(mask_init="random", mask_density=0.05, mask_seed=0)
    peft_model = get_peft_model(model, config)
    peft_model.train()
    ddp = DDP(peft_model)
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(3):
        batch = torch.randint(0, VOCAB, (2, 10), generator=gen)
        opt.zero_grad()
        ddp(input_ids=batch, labels=batch).loss.backward()
        opt.step()
    state = {k: v for k, v in peft_model.state_dict().items() if "sparse_delta" in k}
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
