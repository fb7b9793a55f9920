"""The sparse delta's autograd function.

For a weight stored as ``shape = (rows, cols)`` (``(out, in)`` for ``nn.Linear``, ``(in, out)`` for GPT-2's
``Conv1D``) and k trained coordinates ``idx`` with values ``v``, the delta is ``D = scatter(idx, v)``. The function
computes ``x @ D_lin^T`` or, when composing, ``x @ (W + D)_lin^T`` in one matmul. Only ``x`` is saved for backward
(the weight, values and indices are parameters and buffers that already exist): no dense weight is kept alive.

Backward needs ``dL/dv = G[idx]`` with the stored-layout weight gradient ``G = A^T @ B`` (Linear: ``A = dL/dy``,
``B = x``; Conv1D: ``A = x``, ``B = dL/dy``), computed either

- ``dense``: in row blocks of at most ``block_elements`` entries, gathering each block at the indices it holds
  (indices are sorted, so a block's indices are a contiguous slice); transient memory is one block; or
- ``sampled``: only the k dot products ``sum_t A[t, r_i] * B[t, c_i]``, as a sampled dense-dense matmul on the
  CSR pattern of the indices (``torch.sparse.sampled_addmm``). It does ``T * k`` multiply-adds instead of
  ``T * rows * cols`` and wins below a density that `benchmarks/value_grad_bench.py` measures.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DeltaSpec:
    """Static description of one adapted weight."""

    shape: tuple[int, int]
    transposed: bool  # True for Conv1D: stored (in, out), y = x @ W
    value_grad: str = "auto"  # "auto" | "dense" | "sampled"
    sampled_max_density: float = 0.15
    block_elements: int = 1 << 24


def scatter_delta(values: torch.Tensor, indices: torch.Tensor, shape, dtype=None, base: torch.Tensor | None = None):
    """Dense ``base + scatter(indices, values)`` (or zeros + scatter) in the stored layout, as a new tensor."""
    dtype = dtype or values.dtype
    if base is None:
        out = torch.zeros(shape[0] * shape[1], dtype=dtype, device=values.device)
    else:
        out = base.detach().to(dtype=dtype, copy=True).reshape(-1)
    out.index_add_(0, indices, values.detach().to(dtype))
    return out.view(shape)


def merged_entries(original: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``W + v`` at the trained entries, rounded once to ``W``'s dtype. An fp32/fp64 weight adds in its own dtype, so
    a merged weight equals the transient ``W + delta`` of the training forward bit for bit; a bf16/fp16 weight adds in
    fp64 first (the merge exports, not what bf16 training computes: see `sparse_opd.tuner.merging`)."""
    if original.dtype in (torch.float32, torch.float64):
        return original + values.to(original.dtype)
    return (original.double() + values.double()).to(original.dtype)


def _apply_weight(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return x @ weight if transposed else F.linear(x, weight)


def _grad_input(grad_y: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return grad_y @ weight.T if transposed else grad_y @ weight


def _pick_method(spec: DeltaSpec, k: int) -> str:
    if spec.value_grad != "auto":
        return spec.value_grad
    density = k / (spec.shape[0] * spec.shape[1])
    return "sampled" if density < spec.sampled_max_density else "dense"


def rows_per_block(shape, block_elements: int) -> int:
    """Rows of the stored weight gradient formed at once: blocks of at most ``block_elements`` entries."""
    rows, cols = shape
    return max(1, min(rows, block_elements // cols))


def gathered_weight_grad_dense(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, shape, block_elements: int,
                               observer=None):
    """``(a^T @ b).flatten()[indices]`` computed in row blocks; ``a``: (T, rows), ``b``: (T, cols), indices sorted.

    ``observer(first_row, block)``, if given, sees every block of the weight gradient in float32 (also the blocks
    that hold no index): how gradient statistics are accumulated without ever forming the whole gradient."""
    rows, cols = shape
    step = rows_per_block(shape, block_elements)
    out = torch.empty(indices.numel(), dtype=torch.promote_types(a.dtype, torch.float32), device=a.device)
    bounds = torch.searchsorted(
        indices, torch.arange(0, rows + step, step, device=indices.device).clamp_max(rows) * cols
    ).tolist()
    if observer is not None:
        a, b = a.float(), b.float()
    for block, r0 in enumerate(range(0, rows, step)):
        lo, hi = bounds[block], bounds[block + 1]
        if lo == hi and observer is None:
            continue
        r1 = min(rows, r0 + step)
        g = a[:, r0:r1].T @ b  # (r1 - r0, cols)
        if observer is not None:
            observer(r0, g)
        out[lo:hi] = g.reshape(-1)[indices[lo:hi] - r0 * cols]
    return out


def gathered_weight_grad_sampled(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, shape, block_elements: int):
    """Same result as the dense path from the k needed dot products only: a sampled dense-dense matmul (SDDMM,
    ``torch.sparse.sampled_addmm``) on the CSR pattern of the sorted indices."""
    rows, cols = shape
    compute = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
    crow = torch.searchsorted(indices, torch.arange(rows + 1, device=indices.device) * cols)
    with warnings.catch_warnings():  # torch flags sparse CSR as beta on every first use
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow, indices % cols, torch.zeros(indices.numel(), dtype=compute, device=a.device), (rows, cols),
            check_invariants=False,
        )
    out = torch.sparse.sampled_addmm(pattern, a.T.to(compute), b.to(compute), beta=0.0)
    return out.values()


class SparseDeltaFunction(torch.autograd.Function):
    """``y = x @ (W + sum_j D_j)_lin^T`` if ``weight`` is given, else ``y = x @ (sum_j D_j)_lin^T``.

    ``pairs`` alternates values and indices of each active adapter: ``(v_1, idx_1, v_2, idx_2, ...)``.
    """

    @staticmethod
    def forward(ctx, x, weight, spec: DeltaSpec, observer, *pairs):
        values, indices = pairs[0::2], pairs[1::2]
        effective = _effective_weight(weight, values, indices, spec.shape, x.dtype)
        y = _apply_weight(x, effective, spec.transposed)
        del effective
        ctx.spec = spec
        ctx.observer = observer
        ctx.n_adapters = len(values)
        ctx.has_weight = weight is not None
        ctx.save_for_backward(x, weight, *pairs)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, *pairs = ctx.saved_tensors
        spec = ctx.spec
        values, indices = pairs[0::2], pairs[1::2]
        grad_x = None
        if ctx.needs_input_grad[0]:
            effective = _effective_weight(weight, values, indices, spec.shape, grad_y.dtype)
            grad_x = _grad_input(grad_y, effective, spec.transposed)
            del effective
        grads = []
        observer = ctx.observer
        if observer is not None or any(ctx.needs_input_grad[4 + 2 * j] for j in range(ctx.n_adapters)):
            gy2 = grad_y.reshape(-1, grad_y.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            a, b = (x2, gy2) if spec.transposed else (gy2, x2)
            for j in range(ctx.n_adapters):
                if not ctx.needs_input_grad[4 + 2 * j] and observer is None:
                    grads += [None, None]
                    continue
                if observer is not None:  # the whole weight gradient passes by, block by block, once per call
                    g = gathered_weight_grad_dense(a, b, indices[j], spec.shape, spec.block_elements, observer)
                    observer = None
                else:
                    method = _pick_method(spec, indices[j].numel())
                    fn = gathered_weight_grad_sampled if method == "sampled" else gathered_weight_grad_dense
                    g = fn(a, b, indices[j], spec.shape, spec.block_elements)
                grads += [g.to(values[j].dtype) if ctx.needs_input_grad[4 + 2 * j] else None, None]
        else:
            grads = [None] * (2 * ctx.n_adapters)
        return (grad_x, None, None, None, *grads)


def _effective_weight(weight, values, indices, shape, dtype):
    """``W + sum_j D_j`` (or ``sum_j D_j`` when ``weight`` is None), a new dense tensor in ``dtype``."""
    out = scatter_delta(values[0], indices[0], shape, dtype=dtype, base=weight)
    for v, i in zip(values[1:], indices[1:]):
        out.view(-1).index_add_(0, i, v.detach().to(dtype))
    return out


def sparse_delta_linear(x, weight, spec: DeltaSpec, values: list, indices: list, observer=None):
    """Autograd entry point; see :class:`SparseDeltaFunction`. ``observer(first_row, block)`` is shown the whole
    weight gradient in float32 row blocks during backward (gradient statistics for mask discovery)."""
    pairs = [t for pair in zip(values, indices) for t in pair]
    return SparseDeltaFunction.apply(x, weight, spec, observer, *pairs)


@dataclass(frozen=True)
class CsrPattern:
    """The trained coordinates as the CSR pattern of the matrix that multiplies ``x`` (``delta`` for ``nn.Linear``,
    ``delta^T`` for GPT-2's ``Conv1D``): int32 row starts and columns, and the order of the values in it."""

    offsets: torch.Tensor
    col: torch.Tensor
    order: torch.Tensor | None  # None: the values are already in CSR order
    key: tuple
    def weights(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The values in CSR order and ``dtype`` (converted at every call: optimizers update them in place without
        always bumping a version counter, so no cached copy can be trusted)."""
        v = values.detach().to(dtype)
        return v[self.order] if self.order is not None else v

    @staticmethod
    def build(indices: torch.Tensor, spec: DeltaSpec, key: tuple) -> CsrPattern:
        rows, cols = spec.shape
        r, c = torch.div(indices, cols, rounding_mode="floor"), indices % cols
        if spec.transposed:  # y = x @ D: the matrix applied is D^T (cols x rows), ordered by its rows
            order = torch.argsort(c * rows + r)
            r, c, rows = c[order], r[order], cols
        else:
            order = None  # flat indices are sorted: row-major order is CSR order
        offsets = torch.searchsorted(r, torch.arange(rows, device=r.device))
        return CsrPattern(offsets.to(torch.int32), c.to(torch.int32), order, key)


def sparse_delta_matmul(x: torch.Tensor, values: list, patterns: list[CsrPattern]) -> torch.Tensor:
    """``x @ (sum_j D_j)_lin^T`` from the k trained entries alone, for forwards without gradients (generation,
    evaluation, teacher passes): a weighted gather-sum per output row (``embedding_bag`` over ``x^T``), ``T * k``
    multiply-adds in ``x``'s dtype (as the training forward, which scatters the values into a delta of that dtype),
    no dense delta. `SparseDeltaLayer` keeps each adapter's `CsrPattern` cached; it calls this only where no gradient
    is needed (the values are detached here)."""
    x2 = x.reshape(-1, x.shape[-1])
    table = x2.T.contiguous()  # one row per input feature: each trained entry reads T contiguous values
    out = None
    for v, pattern in zip(values, patterns):
        product = F.embedding_bag(pattern.col, table, pattern.offsets, mode="sum",
                                  per_sample_weights=pattern.weights(v, x.dtype))
        out = product if out is None else out + product
    return out.T.contiguous().reshape(*x.shape[:-1], out.shape[0])  # a contiguous copy adds faster than a strided view
