"""Whitened error of every module at every rank, for the error-aware allocation (``--allocation greedy``).

Each closed form's error at rank r is cheap to read off one factorisation:

- QK / VO / projections (whitening-SVD): ``Σ_{i>r} σ_i²`` (``HeadFactors.errors``, ``ProjFactors.sigma``).
- FFN (Nyström on the pivot order) and ResNet groups (group-pivoted order): with the correlation permuted into
  the selection order, ``P C Pᵀ = L Lᵀ``, eliminating the first r channels leaves the Schur complement
  ``L[:, r:] L[:, r:]ᵀ``, so the residual ``tr(Aᵀ (C − C[:,S] C[S,S]⁻¹ C[S,:]) A)`` of the first r channels is
  ``Σ_{j≥r} ‖Aₚᵀ l_j‖²``: one Cholesky gives the error at every prefix width.

Curves are relative (error at rank r over the error at rank 0), indexed by rank 0..max. Each kind's curve is its
method's ``curve`` (``methods.py``); ``api.module_curves`` makes them for every scored module.
"""

from __future__ import annotations

import logging

import torch

from slimexport.decompose.linalg import cholesky


def prefix_errors(c: torch.Tensor, order: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``err[r] = tr(Aᵀ (C − C[:,S_r] C[S_r,S_r]⁻¹ C[S_r,:]) A)`` for ``S_r = order[:r]``, ``r = 0..n`` (fp64).

    Args:
        c: ``[n, n]`` positive definite correlation; order: a permutation of ``0..n-1``; a: ``[n, m]``.
    """
    p = order.to(c.device)
    L, shifted = cholesky(c[p][:, p], "correlation (error curve)")
    if shifted:  # the curve is then that of a shifted matrix: say so (the decomposition counts its own fallbacks)
        logging.getLogger("slimexport").warning("an error curve's correlation needed the Cholesky fallback (eigenvalue shift)")
    e = ((a.to(c.dtype)[p].T @ L) ** 2).sum(0)  # energy each pivot column carries
    return tail_sums(e)


def tail_sums(e: torch.Tensor) -> torch.Tensor:
    """``out[r] = Σ_{j≥r} e_j`` for ``r = 0..n`` (``out[n] = 0``): the error left when the first r terms are kept."""
    tail = torch.flip(torch.cumsum(torch.flip(e, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)])


def relative(err: torch.Tensor) -> torch.Tensor:
    total = float(err[0])
    return err / total if total > 0 else torch.zeros_like(err)
