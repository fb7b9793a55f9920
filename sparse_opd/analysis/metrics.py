"""Per-matrix metrics of a weight delta ``D = W_tuned - W_base``: pure functions, tensors in, numbers out.

Formulas are in each docstring and collected in docs/analysis.md. ``W`` and ``D`` are 2-D float tensors of equal
shape ``(m, n)``; singular values ``s_1 >= s_2 >= ...`` are those of ``D`` unless stated otherwise.
"""

from __future__ import annotations

import math

import torch

TAUS = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4)
TOP_KS = (1, 2, 4, 8, 16, 32, 64)


def _check_pair(w: torch.Tensor, d: torch.Tensor) -> None:
    if w.dim() != 2 or d.shape != w.shape:
        raise ValueError(f"expected two 2-D tensors of the same shape, got {tuple(w.shape)} and {tuple(d.shape)}")
    if not (w.is_floating_point() and d.is_floating_point()):
        raise TypeError(f"expected floating-point tensors, got {w.dtype} and {d.dtype}")


def relative_norm(w: torch.Tensor, d: torch.Tensor) -> float:
    """``||D||_F / ||W||_F``."""
    _check_pair(w, d)
    return float(d.double().norm() / w.double().norm())


def fraction_unchanged(d: torch.Tensor, taus=TAUS) -> dict[float, float]:
    """``mean(|D| <= tau)`` for each ``tau`` (``tau = 0``: entries that did not change at all)."""
    a = d.abs()
    return {tau: float((a <= tau).double().mean()) for tau in taus}


def singular_values(d: torch.Tensor) -> torch.Tensor:
    """All singular values of ``D`` (float64 on the tensor's device), descending."""
    return torch.linalg.svdvals(d.double())


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


def subspace_alignment(u: torch.Tensor, v: torch.Tensor, d: torch.Tensor, r: int) -> dict[str, float]:
    """Share of ``||D||_F^2`` inside the top-``r`` singular subspaces of ``W = U S V^T``.

    left ``||U_r^T D||^2 / ||D||^2``, right ``||D V_r||^2 / ||D||^2``, both ``||U_r^T D V_r||^2 / ||D||^2``; a random
    isotropic delta expects ``r / m``, ``r / n`` and ``r^2 / (m n)``.
    """
    d = d.double()
    total = float(d.pow(2).sum())
    m, n = d.shape
    ur, vr = u[:, :r].double(), v[:, :r].double()
    left = ur.T @ d
    out = {
        "left": float(left.pow(2).sum()) / total if total else 0.0,
        "right": float((d @ vr).pow(2).sum()) / total if total else 0.0,
        "both": float((left @ vr).pow(2).sum()) / total if total else 0.0,
        "expected_left": r / m,
        "expected_right": r / n,
        "expected_both": r * r / (m * n),
    }
    return out


def near_zero_lift(w: torch.Tensor, changed: torch.Tensor, quantiles=(0.1, 0.25, 0.5)) -> dict[float, float]:
    """For each ``q``: ``P(|W| <= Q_q(|W|) | changed) / q`` (1 = no bias; >1 = changes favour near-zero weights)."""
    a = w.abs().reshape(-1).float()
    c = changed.reshape(-1)
    if not bool(c.any()):
        return {q: float("nan") for q in quantiles}
    sorted_a = torch.sort(a).values
    out = {}
    for q in quantiles:
        thr = sorted_a[max(0, math.ceil(q * a.numel()) - 1)]
        out[q] = float((a[c] <= thr).double().mean()) / q
    return out


def bf16_visible(w: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``bf16(W + D) - bf16(W)``: the delta a bfloat16 checkpoint can show."""
    _check_pair(w, d)
    w32 = w.float()
    return (w32 + d.float()).to(torch.bfloat16).float() - w32.to(torch.bfloat16).float()


def bf16_step(w: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 numbers at ``|W|``: ``2^(floor(log2 |W|) - 7)`` (8 significant bits)."""
    a = w.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(a)) - 7)


def isotropic_like(d: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Gaussian random matrix with the same shape and Frobenius norm as ``D`` (the null model)."""
    g = torch.randn(d.shape, generator=generator, dtype=torch.float64)
    norm = d.double().norm()
    return (g * (norm / g.norm())).to(d.dtype) if norm > 0 else torch.zeros_like(d)
