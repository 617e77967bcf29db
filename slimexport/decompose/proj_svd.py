"""Factored projections by activation-whitened SVD (the ``proj`` target; beyond the paper, method notes §14).

A transformer's ``proj_in``/``proj_out`` is one dense map ``y = x A + b`` (``A = Wᵀ``, in × out). Replacing
``A`` by a rank-r product ``U V`` (``U: in × r``, ``V: r × out``) with the smallest expected output error
over the calibration inputs, ``E‖x (A − UV)‖² = tr((A − UV)ᵀ C (A − UV))`` with ``C = E[xᵀx] = L Lᵀ``, is
``‖Lᵀ (A − UV)‖²_F``: plain low-rank approximation of ``G = Lᵀ A``. Eckart–Young gives, with
``G = P Σ Qᵀ``,

    U = L⁻ᵀ P_r Σ_r^{1/2},   V = Σ_r^{1/2} Q_rᵀ,   error = Σ_{i>r} σ_i²

(Σ^{1/2} on both sides keeps both factors in fp16 range). The bias is kept as it is. The pair costs
``r (in + out)`` parameters and MACs per position against ``in · out`` dense, so it pays only below the
break-even rank ``in·out/(in + out)`` (half the width for a square projection); at that rank the layer stays dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimexport.decompose.linalg import whiten_solve


@dataclass
class ProjFactors:
    """Whitened SVD of one projection, fp64.

    Attributes:
        u: ``[in, k]`` left factors ``L⁻ᵀ P Σ^{1/2}`` for all ``k = min(in, out)`` directions.
        v: ``[k, out]`` right factors ``Σ^{1/2} Qᵀ``.
        sigma: ``[k]`` singular values of ``G = Lᵀ A``, descending.
    """

    u: torch.Tensor
    v: torch.Tensor
    sigma: torch.Tensor

    def truncate(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U [in, r], V [r, out])``."""
        return self.u[:, :rank], self.v[:rank]

    def error(self, rank: int) -> float:
        """Whitened error ``Σ_{i>r} σ_i²``."""
        return float((self.sigma[rank:] ** 2).sum())

    def rel_error(self, rank: int) -> float:
        total = self.error(0)
        return self.error(rank) / total if total > 0 else 0.0


def proj_factors(weight: torch.Tensor, L: torch.Tensor | None) -> ProjFactors:
    """Factor a torch weight ``W [out, in]`` (``A = Wᵀ``) in the coordinates whitened by ``L`` (``C = L Lᵀ``).

    ``L = None`` is the identity (plain weight SVD, the no-activations baseline).
    """
    a = weight.T
    g = a if L is None else L.T @ a
    p, s, qh = torch.linalg.svd(g, full_matrices=False)
    root = s.clamp_min(0).sqrt()
    left = p * root[None, :]
    u = left if L is None else whiten_solve(L, left)
    return ProjFactors(u=u, v=root[:, None] * qh, sigma=s)
