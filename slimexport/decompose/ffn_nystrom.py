"""Type I: GEGLU feed-forward by Nyström column selection.

The module is ``f(x) = z(x) A₂ + b₂`` with ``z = (x A_a + b_a) ⊙ GELU(x A_g + b_g) ∈ R^{m}``. Keeping an index
set ``S`` of intermediate channels commutes with the per-channel GELU and product, so one selection serves
both GEGLU halves. With ``C = E[zᵀz]`` (time-weighted, ridged), the best down-projection for ``z_S`` is least
squares:

    B = C[S,S]⁻¹ C[S,:] A₂                       (r × C_out)
    error(S) = tr(A₂ᵀ (C − C[:,S] C[S,S]⁻¹ C[S,:]) A₂)   (Schur complement = Nyström residual of C)

``S`` comes from greedy pivoting: column-pivoted QR of ``F`` with ``FᵀF = C`` picks the same pivots as
pivoted Cholesky of ``C`` (LAPACK ``dpstrf``), and the pivots are nested, so one factorisation orders all m
channels and any width r takes the first r. With ``S`` = all channels, ``B = A₂`` exactly (permuted).
"""

from __future__ import annotations

import numpy as np
import torch

from slimexport.decompose.linalg import trace_form
from slimexport.errors import NumericalError


def pivoted_cholesky_order(c: torch.Tensor) -> torch.Tensor:
    """Greedy pivot order of all channels (CPQR-equivalent), via LAPACK ``dpstrf`` on the CPU in fp64."""
    from scipy.linalg import lapack

    a = np.asfortranarray(c.detach().to("cpu", torch.float64).numpy())
    _, piv, rank, info = lapack.dpstrf(a, lower=1, tol=-1.0)
    if info < 0:
        raise NumericalError(f"pivoted Cholesky failed (LAPACK info={info})", "recalibrate or raise --ridge")
    order = piv.astype(np.int64) - 1
    return torch.from_numpy(order)


def leverage_order(c: torch.Tensor, lam: float = 1e-2) -> torch.Tensor:
    """MoDeGPT's alternative: channels by descending ridge leverage ``diag(C (C + λ·mean(diag C)·I)⁻¹)``."""
    n = c.shape[0]
    mean = torch.diagonal(c).mean()
    k = c + lam * mean * torch.eye(n, dtype=c.dtype, device=c.device)
    lev = torch.diagonal(torch.linalg.solve(k, c))
    return torch.argsort(lev, descending=True, stable=True).cpu()


def weight_norm_order(w2: torch.Tensor) -> torch.Tensor:
    """Baseline without activations: channels by descending column norm of the down-projection."""
    return torch.argsort(w2.norm(dim=0), descending=True, stable=True).cpu()


def random_order(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)


def least_squares_down(c: torch.Tensor, keep: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Down-projection for kept channels ``S``: torch weight ``[C_out, r] = (C[S,S]⁻¹ C[S,:] A₂)ᵀ``."""
    css = c[keep][:, keep]
    csa = c[keep] @ w2.T.to(c.dtype)  # [r, C_out] = C[S,:] A₂
    L, info = torch.linalg.cholesky_ex(css)
    if int(info) != 0:
        sol = torch.linalg.lstsq(css, csa).solution
    else:
        sol = torch.cholesky_solve(csa, L)
    return sol.T


def total_energy(c: torch.Tensor, w2: torch.Tensor) -> float:
    """``tr(A₂ᵀ C A₂)``: the error of keeping no channel."""
    return trace_form(c, w2.T)


def residual(c: torch.Tensor, keep: torch.Tensor, down: torch.Tensor, total: float) -> float:
    """``tr(A₂ᵀ (C/C[S,S]) A₂) = tr(A₂ᵀ C A₂) − tr(Bᵀ C[S,S] B)`` for the least-squares down-projection of ``keep``.

    Args:
        down: :func:`least_squares_down` of ``keep`` (torch layout ``[C_out, r]``); total: :func:`total_energy`.
    """
    if keep.numel() >= c.shape[0]:
        return 0.0
    return max(total - trace_form(c[keep][:, keep], down.T), 0.0)  # down.T: B [r, C_out]


def nystrom_errors(c: torch.Tensor, order: torch.Tensor, w2: torch.Tensor, widths: list[int]) -> dict[int, float]:
    """Residual ``tr(A₂ᵀ (C/C[S,S]) A₂)`` for the first ``r`` channels of ``order``, for each ``r`` in ``widths``."""
    total = total_energy(c, w2)
    out = {}
    for r in widths:
        keep = order[:r]
        out[r] = 0.0 if r >= c.shape[0] else residual(c, keep, least_squares_down(c, keep, w2), total)
    return out


def ffn_slim_weights(
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, c: torch.Tensor, order: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slim GEGLU weights for the first ``width`` channels of ``order``.

    Args:
        w1: ``[2m, C]`` GEGLU ``proj`` weight (content rows ``[0, m)``, gate rows ``[m, 2m)``); ``b1`` ``[2m]``.
        w2: ``[C_out, m]`` down-projection weight.
        c: ``[m, m]`` time-weighted, ridged correlation of the GEGLU output (fp64).
        order: channel pivot order; ``width``: channels kept.

    Returns:
        ``(proj.weight [2r, C], proj.bias [2r], net.2.weight [C_out, r])``.
    """
    m = w2.shape[1]
    keep = kept_channels(order, width)
    rows = torch.cat([keep, keep + m])
    return w1[rows], b1[rows], least_squares_down(c, keep, w2)


def kept_channels(order: torch.Tensor, width: int) -> torch.Tensor:
    """The first ``width`` channels of ``order``, sorted: full width reproduces the dense layer's channel order."""
    return torch.sort(order[:width]).values
