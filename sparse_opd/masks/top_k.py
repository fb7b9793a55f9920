"""The top-k coordinates of scores spread over ranks, found without gathering the scores on one rank.

Each rank holds some coordinates of each module (any partition: slices of flat positions). A non-negative float32
orders like its bit pattern read as an integer, so the k-th largest score of a module is located by histogram
refinement on those bits: three passes (11, 11 and 9 bits, high to low), each a histogram of the candidates still in
play, summed over the ranks by one all-reduce for all modules at once. The threshold found is exact; coordinates above
it are kept, and the ties at it are kept in rank order, then by position, until the module's count is met. Only the
selected coordinates (the mask itself) are gathered, so every rank ends with the same mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .budget import allocate_budget
from .sparse_mask import SparseMask

_PASSES = ((20, 11), (9, 11), (0, 9))  # (shift, width): the 31 bits of a non-negative float32, high to low


def _distributed(group) -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    return 1, 0


def _all_reduce(tensor: torch.Tensor, group, world: int) -> torch.Tensor:
    if world > 1:
        torch.distributed.all_reduce(tensor, group=group)
    return tensor


def _all_gather(tensor: torch.Tensor, group, world: int) -> torch.Tensor:
    """``(world, *tensor.shape)``: every rank's tensor (all the same shape)."""
    if world == 1:
        return tensor[None]
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def _bits(name: str, scores: torch.Tensor) -> torch.Tensor:
    scores = scores.float()
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise ValueError(f"{name}: scores must be finite and >= 0 to rank coordinates (NaN or inf in the gradient?)")
    return scores.contiguous().view(torch.int32)


def top_k_indices(slices: Mapping[str, Sequence[tuple[int, torch.Tensor]]], counts: Mapping[str, int],
                  group=None) -> dict[str, torch.Tensor]:
    """Per module, the sorted int64 flat positions of its ``counts[name]`` largest scores over all ranks.

    ``slices[name]``: this rank's ``(first flat position, scores)`` pieces of the module (float32, >= 0). A
    collective: every rank calls it with the same module names and counts.
    """
    names = list(counts)
    world, rank = _distributed(group)
    total = torch.tensor([sum(s.numel() for _, s in slices.get(n, ())) for n in names], dtype=torch.long)
    _all_reduce(total, group, world)
    for name, available, count in zip(names, total.tolist(), (counts[n] for n in names)):
        if not 0 < count <= available:
            raise ValueError(f"{name}: cannot keep {count} coordinates out of {available} scored")
    bits = {n: [(start, _bits(n, s)) for start, s in slices.get(n, ())] for n in names}
    need = torch.tensor([counts[n] for n in names], dtype=torch.long)
    prefix = torch.zeros(len(names), dtype=torch.long)
    known = 31  # low bit position above which the threshold's bits are known
    for shift, width in _PASSES:
        hist = torch.zeros(len(names), 1 << width, dtype=torch.long)
        for m, name in enumerate(names):
            for _, b in bits[name]:
                if known < 31:
                    b = b[(b >> known) == prefix[m]]
                hist[m] += torch.bincount(((b >> shift) & ((1 << width) - 1)).long(), minlength=1 << width)
        _all_reduce(hist, group, world)
        from_top = hist.flip(1).cumsum(1)  # candidates in this bucket or above
        above = (from_top < need[:, None]).sum(1)  # buckets entirely kept, from the top
        kept = torch.where(above > 0, from_top.gather(1, (above - 1).clamp(min=0)[:, None])[:, 0], 0)
        need -= kept
        prefix = (prefix << width) | ((1 << width) - 1 - above)
        known = shift
    threshold = prefix  # the k-th largest score's bits, per module; `need` of its ties are kept
    ties = torch.tensor([sum(int((b == threshold[m]).sum()) for _, b in bits[n]) for m, n in enumerate(names)],
                        dtype=torch.long)
    ties_by_rank = _all_gather(ties, group, world)
    before = ties_by_rank[:rank].sum(0) if rank else torch.zeros_like(ties)
    take = (need - before).clamp(min=0).minimum(ties)
    local = []
    for m, name in enumerate(names):
        chosen, left = [], int(take[m])
        for start, b in bits[name]:
            chosen.append(start + torch.nonzero(b > threshold[m])[:, 0])
            if left:
                tied = start + torch.nonzero(b == threshold[m])[:left, 0]
                left -= tied.numel()
                chosen.append(tied)
        local.append(torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long))
    return _gather_selection(names, local, group, world)


def _gather_selection(names: list[str], local: list[torch.Tensor], group, world: int) -> dict[str, torch.Tensor]:
    sizes = torch.tensor([t.numel() for t in local], dtype=torch.long)
    flat = torch.cat(local) if local else torch.zeros(0, dtype=torch.long)
    if world == 1:
        return {n: torch.sort(t).values for n, t in zip(names, local)}
    all_sizes = _all_gather(sizes, group, world)  # (world, modules)
    width = int(all_sizes.sum(1).max())
    padded = torch.nn.functional.pad(flat, (0, width - flat.numel()))
    everything = _all_gather(padded, group, world)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for r in range(world):
        offset = 0
        for name, size in zip(names, all_sizes[r].tolist()):
            parts[name].append(everything[r, offset:offset + size])
            offset += size
    return {n: torch.sort(torch.cat(parts[n])).values for n in names}


def top_k_mask(scores: Mapping[str, torch.Tensor], density=None, total=None, block_weights="ffn") -> SparseMask:
    """Per module, the coordinates with the largest score (whole score tensors on one process), with counts from
    `allocate_budget`."""
    shapes = {name: tuple(s.shape) for name, s in scores.items()}
    counts = allocate_budget(shapes, density=density, total=total, block_weights=block_weights)
    indices = {name: torch.topk(s.reshape(-1), counts[name]).indices.cpu() for name, s in scores.items()}
    return SparseMask(indices, shapes)
