"""Per-matrix metrics of a weight delta ``D = W_tuned - W_base``: pure functions, tensors in, numbers out.

Formulas are in each docstring and collected in docs/analysis.md. ``W`` and ``D`` are 2-D float tensors of equal
shape ``(m, n)``; singular values ``s_1 >= s_2 >= ...`` are those of ``D`` unless stated otherwise.
"""

from __future__ import annotations

import math

import torch

from ..masks.changes import bf16_visible
from ..masks.changes import changed_entries as _changed

TAUS = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4)
TOP_KS = (1, 2, 4, 8, 16, 32, 64)
RANK_TAUS = (1e-2, 1e-3, 1e-4, 1e-5)  # numerical rank: s_i > tau * s_1
ALIGN_FRACTIONS = (0.01, 0.05, 0.1, 0.25)  # source subspace size r as a fraction of min(m, n)


def _check_pair(w: torch.Tensor, d: torch.Tensor) -> None:
    if w.dim() != 2 or d.shape != w.shape:
        raise ValueError(f"expected two 2-D tensors of the same shape, got {tuple(w.shape)} and {tuple(d.shape)}")
    if not (w.is_floating_point() and d.is_floating_point()):
        raise TypeError(f"expected floating-point tensors, got {w.dtype} and {d.dtype}")


CHUNK_ENTRIES = 1 << 21  # entries per row block of the streaming passes: their transients stay a few MiB


def row_blocks(x: torch.Tensor, entries: int | None = None):
    """Consecutive row blocks of a 2-D tensor holding about ``entries`` (default `CHUNK_ENTRIES`) entries each
    (views, not copies)."""
    rows = max(1, (entries or CHUNK_ENTRIES) // max(1, x.shape[1]))
    for r0 in range(0, x.shape[0], rows):
        yield x[r0 : r0 + rows]


def energy(x: torch.Tensor) -> float:
    """``||X||_F^2`` accumulated in float64 over row blocks (no float64 copy of ``X``)."""
    return sum(float(block.double().pow_(2).sum()) for block in row_blocks(x))


def relative_norm(w: torch.Tensor, d: torch.Tensor) -> float:
    """``||D||_F / ||W||_F`` (NaN for an all-zero ``W``)."""
    _check_pair(w, d)
    w_energy = energy(w)
    return (energy(d) / w_energy) ** 0.5 if w_energy else float("nan")


def fraction_unchanged(d: torch.Tensor, taus=TAUS) -> dict[float, float]:
    """``mean(|D| <= tau)`` for each ``tau`` (``tau = 0``: entries that did not change at all), over row blocks."""
    counts = dict.fromkeys(taus, 0)
    for block in row_blocks(_as_2d(d)):
        a = block.float().abs()
        for tau in taus:
            counts[tau] += int((a <= tau).sum())
    return {tau: count / d.numel() for tau, count in counts.items()}


def fraction_unchanged_bf16(w: torch.Tensor, d: torch.Tensor, taus=TAUS) -> dict[float, float]:
    """``mean(|bf16(W + D) - bf16(W)| <= tau)``: how much of ``D`` a bfloat16 checkpoint cannot show."""
    _check_pair(w, d)
    counts = dict.fromkeys(taus, 0)
    for wb, db in zip(row_blocks(w), row_blocks(d)):
        visible = bf16_visible(wb, db).abs()
        for tau in taus:
            counts[tau] += int((visible <= tau).sum())
    return {tau: count / d.numel() for tau, count in counts.items()}


def fraction_below_half_bf16_step(w: torch.Tensor, d: torch.Tensor) -> float:
    """``mean(|D| < bf16_step(W) / 2)``: entries whose update a bf16 weight rounds away."""
    _check_pair(w, d)
    below = sum(int((db.float().abs() < 0.5 * bf16_step(wb)).sum()) for wb, db in zip(row_blocks(w), row_blocks(d)))
    return below / d.numel()


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(1, -1)


GRAM_ABOVE = 1 << 22  # entries; larger matrices go through a float64 Gram matrix of the smaller side


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``X^T X`` in float64 for ``X`` (m, n) with ``m >= n``, accumulated over row blocks (bounded transients)."""
    g = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for block in row_blocks(x):
        block = block.double()
        g.addmm_(block.T, block)
    return g


def singular_values(d: torch.Tensor) -> torch.Tensor:
    """All singular values of ``D`` (float64), descending.

    Small matrices: LAPACK on the float32 matrix. Above ``GRAM_ABOVE`` entries: ``sqrt(eig(G))`` of the float64 Gram
    matrix of the smaller side, which never copies ``D`` and resolves ``s_i / s_1`` down to ~1e-7 (enough for the
    1e-3 rank threshold).
    """
    if d.numel() <= GRAM_ABOVE:
        return torch.linalg.svdvals(d.float()).double()
    x = d if d.shape[0] >= d.shape[1] else d.T
    eig = torch.linalg.eigvalsh(_gram(x)).flip(0).clamp_min(0)
    return eig.sqrt()


def top_singular_subspaces(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_r, V_r)``: the top-``r`` left and right singular vectors of ``W`` (float32).

    From the eigenvectors of the Gram matrix of the smaller side: ``V_r`` = top eigenvectors of ``W^T W`` and
    ``U_r = W V_r / s_r`` (or the transpose), so no ``m x n`` factor is formed. Float32 is enough for subspaces (unlike
    the small singular values of a delta, see `singular_values`) and halves the cost of the largest matrices.
    """
    x = (w if w.shape[0] >= w.shape[1] else w.T).float()
    evals, evecs = torch.linalg.eigh(x.T @ x)
    top = evecs[:, -r:].flip(1)
    s = evals[-r:].flip(0).clamp_min(torch.finfo(torch.float32).tiny).sqrt()
    other = (x @ top) / s
    return (other, top) if w.shape[0] >= w.shape[1] else (top, other)


def numerical_rank(s: torch.Tensor, tau: float = 1e-3) -> int:
    """``#{i : s_i > tau * s_1}``; 0 for a zero delta."""
    if s.numel() == 0 or s[0] == 0:
        return 0
    return int((s > tau * s[0]).sum())


def stable_rank(s: torch.Tensor) -> float:
    """``sum s_i^2 / s_1^2``."""
    return float((s.double() ** 2).sum() / s[0].double() ** 2) if s.numel() and s[0] > 0 else 0.0


def effective_rank(s: torch.Tensor) -> float:
    """``exp(-sum p_i log p_i)`` with ``p_i = s_i^2 / sum s_j^2`` (energy entropy)."""
    e = s.double() ** 2
    if e.sum() == 0:
        return 0.0
    p = e / e.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def top_k_energy(s: torch.Tensor, ks=TOP_KS) -> dict[int, float]:
    """``sum_{i<=k} s_i^2 / sum_i s_i^2`` for each ``k``."""
    e = s.double() ** 2
    total = e.sum()
    return {k: float(e[:k].sum() / total) if total > 0 else 0.0 for k in ks}


def subspace_size(fraction: float, m: int, n: int) -> int:
    """``r = max(1, int(fraction * min(m, n)))``: the size of the source subspace, as in the paper's own code."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the subspace fraction must be in (0, 1], got {fraction}")
    return max(1, int(fraction * min(m, n)))


def subspace_alignment(u: torch.Tensor, v: torch.Tensor, d: torch.Tensor, r: int) -> dict[str, float]:
    """Share of ``||D||_F^2`` inside the top-``r`` singular subspaces of ``W = U S V^T`` (``u``, ``v``: at least
    ``r`` leading singular vectors as columns).

    left ``||U_r^T D||^2 / ||D||^2``, right ``||D V_r||^2 / ||D||^2``, both ``||U_r^T D V_r||^2 / ||D||^2``; a random
    isotropic delta expects ``r / m``, ``r / n`` and ``r^2 / (m n)``.
    """
    return alignment_sweep(u, v, d, [r])[r]


def alignment_sweep(u: torch.Tensor, v: torch.Tensor, d: torch.Tensor, ranks) -> dict[int, dict[str, float]]:
    """`subspace_alignment` for several ``r`` at the cost of one: ``D`` is projected once onto the largest subspace
    and every smaller ``r`` reads a leading block of the projections."""
    total = energy(d)
    m, n = d.shape
    r_max = max(ranks)
    u_max, v_max = u[:, :r_max].double(), v[:, :r_max].double()
    # float64 products over row blocks of D (no float64 copy of D): a float32 product accumulated with another CPU's
    # kernels put a share at 1.0000011
    left = torch.zeros(r_max, n, dtype=torch.float64)
    right_cols = torch.zeros(r_max, dtype=torch.float64)
    row = 0
    for block in row_blocks(d):
        b = block.double()
        left += u_max[row:row + b.shape[0]].T @ b
        right_cols += (b @ v_max).pow_(2).sum(0)
        row += b.shape[0]
    left_rows = left.pow(2).sum(1).cumsum(0)
    right_cols = right_cols.cumsum(0)
    both = (left @ v_max).pow(2)  # (r_max, r_max)
    out = {}
    for r in ranks:
        shares = (float(left_rows[r - 1]), float(right_cols[r - 1]), float(both[:r, :r].sum()))
        # a share of an energy is at most 1; singular vectors orthonormal only to rounding could exceed it
        out[r] = {key: min(1.0, value / total) if total else 0.0 for key, value in zip(("left", "right", "both"),
                                                                                        shares)}
        out[r].update(expected_left=r / m, expected_right=r / n, expected_both=r * r / (m * n))
    return out


def abs_quantiles(w: torch.Tensor, quantiles=(0.1, 0.25, 0.5)) -> dict[float, float]:
    """``Q_q(|W|)``: the ``ceil(q * numel)``-th smallest ``|W|``, exactly, in two streamed passes.

    Non-negative float32 values order like their bit patterns: a histogram of the top 16 bits locates the bucket
    holding each order statistic, and a histogram of the low 15 bits inside that bucket gives its exact bit pattern.
    No sort and no copy of a bucket, which can hold most of the tensor (a zero delta, a dequantized weight).
    """
    x = w if w.dim() == 2 else w.reshape(1, -1)
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for block in row_blocks(x):
        hist += torch.bincount(block.float().abs().view(torch.int32).reshape(-1) >> 15, minlength=1 << 16)
    cum = hist.cumsum(0)
    targets = {}
    for q in quantiles:
        k = max(1, math.ceil(q * w.numel()))
        bucket = int(torch.searchsorted(cum, k))
        targets[q] = (bucket, k - (int(cum[bucket - 1]) if bucket else 0))
    low = {b: torch.zeros(1 << 15, dtype=torch.int64) for b, _ in targets.values()}
    for block in row_blocks(x):
        bits = block.float().abs().view(torch.int32).reshape(-1)
        top = bits >> 15
        for b, counts in low.items():
            counts += torch.bincount(bits[top == b] & 0x7FFF, minlength=1 << 15)
    out = {}
    for q, (b, rank) in targets.items():
        offset = int(torch.searchsorted(low[b].cumsum(0), rank))
        out[q] = float(torch.tensor([(b << 15) | offset], dtype=torch.int32).view(torch.float32))
    return out


CHANGE_RULES = ("raw", "bf16", "top")


def changed_entries(w: torch.Tensor, d: torch.Tensor, rule: str, threshold: float) -> torch.Tensor:
    """`sparse_opd.masks.changes.changed_entries` by rule: ``"raw"`` (``|D| > threshold``; ``"top"`` is the same rule
    with an order statistic of ``|D|`` as the threshold) or ``"bf16"`` (what two bf16 checkpoints would show)."""
    if rule not in CHANGE_RULES:
        raise ValueError(f"rule must be one of {CHANGE_RULES}, got {rule!r}")
    return _changed(w, d, threshold, "bf16" if rule == "bf16" else "raw")


def near_zero_lift(w: torch.Tensor, d: torch.Tensor, rule: str = "raw", threshold: float = 1e-5,
                   quantiles=(0.1, 0.25, 0.5), thresholds: dict[float, float] | None = None) -> dict[float, float]:
    """For each ``q``: ``P(|W| <= Q_q(|W|) | changed) / q`` (1 = no bias; >1 = changes favour near-zero weights).

    ``changed`` is `changed_entries(W, D, rule, threshold)`: ``|D| > threshold`` (``"raw"``), the largest updates
    (``"top"``: pass ``threshold = Q_0.9(|D|)`` for the largest 10%), or the bf16-visible ones (``"bf16"``).
    Streamed over row blocks; ``thresholds`` (from `abs_quantiles`) can be passed to score several deltas against
    one weight without recomputing ``Q_q(|W|)``.
    """
    _check_pair(w, d)
    thresholds = thresholds or abs_quantiles(w, quantiles)
    changed, below = 0, dict.fromkeys(quantiles, 0)
    for wb, db in zip(row_blocks(w), row_blocks(d)):
        c = changed_entries(wb, db, rule, threshold)
        changed += int(c.sum())
        a = wb.float().abs()
        for q in quantiles:
            below[q] += int((c & (a <= thresholds[q])).sum())
    return {q: below[q] / changed / q if changed else float("nan") for q in quantiles}


def bf16_step(w: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at ``|W|``: ``2^(floor(log2 |W|) - 7)`` (8 significant bits)."""
    a = w.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


def isotropic_like(d: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Gaussian random matrix with the same shape and Frobenius norm as ``D`` (the null model)."""
    g = torch.randn(d.shape, generator=generator, dtype=torch.float32)
    norm = energy(d) ** 0.5
    if norm == 0:
        return torch.zeros_like(d)
    return g.mul_(norm / energy(g) ** 0.5).to(d.dtype)
