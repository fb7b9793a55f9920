"""Per-coordinate statistics of a weight gradient over micro-batches, sharded over the ranks, never a whole gradient.

`GradientStatistics` receives each adapted weight's gradient one row block at a time, while backward produces it (see
`SparseDeltaLayer.set_weight_grad_observer`), and adds the block into two float32 accumulators per coordinate:
``s1 = sum_t g_t`` and ``s2 = sum_t g_t^2`` over the observed micro-batches ``t`` (only the one a statistic needs:
``"fisher"`` and ``"mean"`` keep one). With several ranks each block is summed over the ranks by a reduce-scatter, and
each rank keeps only its slice of every block: 8 bytes per adapted weight entry (4 with one accumulator) divided by
the number of ranks, plus one block in flight. No optimizer state, no copy of the weights.

Scores (`STATISTICS`), with ``n`` micro-batches, ``mean = s1 / n`` and ``rms = sqrt(s2 / n)``:

- ``"snr"``: ``|mean| / (rms + eps)``, the size of AdamW's normalized step ``m / (sqrt(v) + eps)`` for a steady
  gradient: what the first steps of an AdamW run move most. In ``[0, 1]``.
- ``"gain"``: ``mean^2 / (rms + eps)``, the first-order loss decrease of one AdamW step on that coordinate alone
  (the step ``lr * mean / rms`` times the gradient ``mean``): consistency and size together.
- ``"fisher"``: ``s2 / n``, the mean squared gradient (the diagonal empirical Fisher): what SGD-like methods and
  Fisher-based pruning rank by.
- ``"mean"``: ``|mean|``, the size of the accumulated gradient: what plain SGD would move most.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STATISTICS = ("snr", "gain", "fisher", "mean")
# the accumulators each statistic reads
NEEDS = {"snr": ("s1", "s2"), "gain": ("s1", "s2"), "fisher": ("s2",), "mean": ("s1",)}


@dataclass
class _Slice:
    """This rank's part of one row block of a weight: flat positions ``start .. start + length`` of the weight."""

    start: int
    length: int
    s1: torch.Tensor | None
    s2: torch.Tensor | None


@dataclass
class _Module:
    shape: tuple[int, int]
    slices: dict[int, _Slice] = field(default_factory=dict)  # first row of the block -> this rank's slice
    samples: int = 0


class GradientStatistics:
    """Accumulates ``sum g`` and ``sum g^2`` per coordinate of the given weights (module name -> stored shape).

    ``group``: the process group to sum over (None: the default group when torch.distributed is initialized, else
    a single process). Every rank must observe the same blocks in the same order (backward does, for models whose
    every adapted layer runs on every rank). ``statistics``: the scores that will be asked for (their accumulators
    are kept, no others).
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], group=None, statistics=STATISTICS,
                 block_rows: dict[str, int] | None = None, device=None):
        unknown = [s for s in statistics if s not in STATISTICS]
        if unknown:
            raise ValueError(f"statistics must be among {STATISTICS}, got {unknown}")
        self.kept = {acc for s in statistics for acc in NEEDS[s]}
        self.modules = {name: _Module(tuple(shape)) for name, shape in shapes.items()}
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.group = group
        self.world = torch.distributed.get_world_size(group) if distributed else 1
        self.rank = torch.distributed.get_rank(group) if distributed else 0
        self._allocate(block_rows or {}, device)

    def _allocate(self, block_rows: dict[str, int], device) -> None:
        """Every accumulator up front, as views of one buffer per kind: allocated before the first forward, they
        never interleave with the activations that later batches allocate and free (measured: lazily allocated
        accumulators fragmented the heap by another ~6 B per entry over four batches)."""
        layout = []
        for name, module in self.modules.items():
            rows, cols = module.shape
            step = block_rows.get(name, rows)
            for r0 in range(0, rows, step):
                numel = (min(rows, r0 + step) - r0) * cols
                chunk = -(-numel // self.world)
                length = max(0, min(chunk, numel - self.rank * chunk))
                layout.append((module, r0, r0 * cols + self.rank * chunk, length))
        total = sum(length for *_, length in layout)
        buffers = {acc: torch.zeros(total, dtype=torch.float32, device=device) if acc in self.kept else None
                   for acc in ("s1", "s2")}
        offset = 0
        for module, r0, start, length in layout:
            views = {acc: buf[offset:offset + length] if buf is not None else None for acc, buf in buffers.items()}
            module.slices[r0] = _Slice(start, length, views["s1"], views["s2"])
            offset += length

    def observer(self, name: str):
        """The callable a layer calls with each block of its weight gradient: ``observer(first_row, block)``."""
        module = self.modules[name]

        def observe(first_row: int, block: torch.Tensor) -> None:
            self._add(module, first_row, block)

        return observe

    def _add(self, module: _Module, first_row: int, block: torch.Tensor) -> None:
        flat = block.detach().reshape(-1).float()
        numel = flat.numel()
        chunk = -(-numel // self.world)
        if self.world > 1:
            if chunk * self.world != numel:
                flat = torch.nn.functional.pad(flat, (0, chunk * self.world - numel))
            part = torch.empty(chunk, dtype=flat.dtype, device=flat.device)
            torch.distributed.reduce_scatter_tensor(part, flat, group=self.group)
        else:
            part = flat
        length = max(0, min(chunk, numel - self.rank * chunk))
        part = part[:length]
        entry = module.slices.get(first_row)
        if entry is None or entry.length != length:
            raise RuntimeError(f"a gradient block of {numel} entries at row {first_row} does not match the blocks the "
                               "statistics were laid out for (block_rows)")
        if entry.s1 is not None:
            entry.s1.add_(part)
        if entry.s2 is not None:
            entry.s2.addcmul_(part, part)
        if first_row == 0:
            module.samples += 1

    @property
    def samples(self) -> int:
        """Micro-batches observed (by the module observed least)."""
        return min((m.samples for m in self.modules.values()), default=0)

    def accumulator_bytes(self) -> int:
        """Bytes held by this rank's accumulators."""
        return sum(t.numel() * t.element_size() for m in self.modules.values() for s in m.slices.values()
                   for t in (s.s1, s.s2) if t is not None)

    def scores(self, statistic: str = "snr", eps: float = 1e-8,
               keep: bool = False) -> dict[str, list[tuple[int, torch.Tensor]]]:
        """Per module, this rank's coordinates as ``(first flat position, float32 scores >= 0)`` slices. Computed in
        place over the accumulators, which are consumed (the scores take half of their memory), unless ``keep``
        (scores on copies: several statistics from one pass, for comparisons)."""
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        if not set(NEEDS[statistic]) <= self.kept:
            raise ValueError(f"statistic {statistic!r} needs accumulators that were not kept (statistics=...)")
        out = {}
        for name, module in self.modules.items():
            n = module.samples
            if n == 0:
                raise ValueError(f"{name}: no gradient was observed; did every adapted layer take part in the loss?")
            slices = []
            for entry in sorted(module.slices.values(), key=lambda e: e.start):
                s1, s2 = ((t.clone() if t is not None else None for t in (entry.s1, entry.s2)) if keep
                          else (entry.s1, entry.s2))
                if statistic in ("snr", "gain"):
                    rms = s2.div_(n).sqrt_().add_(eps)
                    s1.abs_().div_(n)
                    s1.mul_(s1).div_(rms) if statistic == "gain" else s1.div_(rms)
                elif statistic == "fisher":
                    s1 = s2.div_(n)
                else:
                    s1.abs_().div_(n)
                if not keep:
                    entry.s1 = entry.s2 = None
                slices.append((entry.start, s1))
            if not keep:
                module.slices = {}
            out[name] = slices
        return out
