"""Linear-algebra helpers for the closed-form decompositions (fp64, ridge, Cholesky with fallback).

Conventions: a correlation ``C`` is symmetric positive semi-definite ``[n, n]``; "math" weights are
``A = W.T`` (in × out) of a torch ``nn.Linear`` weight ``W`` (out × in).
"""

from __future__ import annotations

import torch

from slimexport.errors import NumericalError

# Relative eigenvalue floor added when Cholesky still fails after the ridge (SVD-LLM adds −λ_min + 1e-6).
CHOLESKY_FALLBACK_FLOOR = 1e-6


def ridge(c: torch.Tensor, delta: float) -> torch.Tensor:
    """``C + δ · (tr C / n) · I``: a ridge relative to the mean eigenvalue."""
    n = c.shape[-1]
    scale = torch.diagonal(c, dim1=-2, dim2=-1).sum(-1) / n
    if not torch.isfinite(scale).all():
        raise NumericalError("correlation matrix has NaN/Inf", "recalibrate; check the model for fp16 overflow (use --calib-dtype fp32)")
    scale = torch.clamp(scale, min=torch.finfo(c.dtype).tiny)
    return c + delta * scale[..., None, None] * torch.eye(n, dtype=c.dtype, device=c.device)


def cholesky(c: torch.Tensor, what: str = "correlation") -> tuple[torch.Tensor, bool]:
    """Lower Cholesky factor ``L`` (``C = L Lᵀ``) in the input's dtype.

    Returns ``(L, used_fallback)``. On failure adds ``(−λ_min + floor·mean λ) I`` once (SVD-LLM's fallback).
    """
    L, info = torch.linalg.cholesky_ex(c)
    if int(info.max()) == 0:
        return L, False
    evals = torch.linalg.eigvalsh(c)
    mean = evals.mean().abs().clamp_min(torch.finfo(c.dtype).tiny)
    shift = (-evals.min()).clamp_min(0) + CHOLESKY_FALLBACK_FLOOR * mean
    L, info = torch.linalg.cholesky_ex(c + shift * torch.eye(c.shape[-1], dtype=c.dtype, device=c.device))
    if int(info.max()) != 0:
        raise NumericalError(f"{what} is not positive definite even after a ridge", "recalibrate with more prompts or a larger --ridge")
    return L, True


def trace_form(c: torch.Tensor, a: torch.Tensor) -> float:
    """``tr(Aᵀ C A)`` for ``C [n, n]`` and ``A [n, m]``: the output energy of ``A`` under the correlation ``C``."""
    a = a.to(c.dtype)
    return float(((c @ a) * a).sum())


def whiten_solve(L: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``L⁻ᵀ m`` by a triangular solve (never an explicit inverse)."""
    return torch.linalg.solve_triangular(L.transpose(-2, -1), m, upper=True)


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise NumericalError(f"{what} contains NaN/Inf", "recalibrate; check the model for fp16 overflow (use --calib-dtype fp32)")
