"""Reading sharded parameters whole: DeepSpeed ZeRO-3 partitions and FSDP2 ``DTensor`` shards.

Code that reads a weight outside its module's forward (fingerprints, priors, merging, telemetry, weight sync) sees an
empty tensor under ZeRO-3 and a local shard under FSDP2. `gathered` materializes full tensors for the duration of a
block. Gathering is a collective: every rank must enter the same `gathered` blocks in the same order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch


def is_zero3_param(tensor: torch.Tensor) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (``deepspeed.zero.Init`` or a stage-3 engine)."""
    return hasattr(tensor, "ds_id")


def _available(param: torch.Tensor) -> bool:
    """A ZeRO-3 parameter that is gathered already (by a forward, or an enclosing `GatheredParameters`): gathering
    it again would nest contexts over the same parameter, which DeepSpeed refuses."""
    status = getattr(param, "ds_status", None)
    return getattr(status, "name", None) == "AVAILABLE"


def is_dtensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed support
        return False
    return isinstance(tensor, DTensor)


def is_sharded(tensor: torch.Tensor) -> bool:
    return is_zero3_param(tensor) or is_dtensor(tensor)


def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole tensor, also when this rank holds only a partition of it."""
    if is_zero3_param(tensor):
        return tuple(tensor.ds_shape)
    return tuple(tensor.shape)


def full_numel(tensor: torch.Tensor) -> int:
    return math.prod(full_shape(tensor))


@contextlib.contextmanager
def gathered(tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Full, read-only views of ``tensors`` for the duration of the block (the tensors themselves when not sharded).

    ZeRO-3 parameters are gathered in place (``deepspeed.zero.GatheredParameters``, released on exit); DTensors are
    all-gathered into new local tensors. Writes to the yielded tensors are not propagated back.
    """
    zero3 = [t for t in tensors if is_zero3_param(t) and not _available(t)]
    context = contextlib.nullcontext()
    if zero3:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(zero3, modifier_rank=None)
    with context:
        yield [t.full_tensor() if is_dtensor(t) else t for t in tensors]


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded parameter (the whole tensor when it is not sharded)."""
    if is_zero3_param(tensor):
        return tensor.ds_tensor
    if is_dtensor(tensor):
        return tensor.to_local()
    return tensor


def sum_over_shards(value: torch.Tensor, sharded: bool) -> torch.Tensor:
    """Sum a per-rank partial result over the ranks when it was computed on shards (a collective); unsharded results
    are already whole on every rank."""
    if not sharded or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    value = value.clone()
    torch.distributed.all_reduce(value)
    return value
