"""Run by tests/tuner/test_fsdp.py under `torchrun --nproc_per_node 2`: FSDP2 (fully_shard) over a sparse delta."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.helpers
from sparse_opd import SparseDeltaConfig
from tests.helpers.tiny_models import VOCAB, make_model


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    peft_model = get_peft_model(make_model("llama", seed=0), SparseDeltaConfig(mask_init="random", mask_density=0.05))
    peft_model.train()
    for layer in peft_model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(peft_model)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)
    losses = []
    batch = torch.randint(0, VOCAB, (2, 10), generator=gen)
    for _ in range(4):
        opt.zero_grad()
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    full = {n: p.full_tensor().detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    torch.save({"losses": losses, "values": full}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
