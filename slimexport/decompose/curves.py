"""Whitened error of every module at every rank, for the error-aware allocation (``--allocation greedy``).

Each closed form's error at rank r is cheap to read off one factorisation:

- QK / VO / projections (whitening-SVD): ``Σ_{i>r} σ_i²`` (``HeadFactors.errors``, ``ProjFactors.sigma``).
- FFN (Nyström on the pivot order) and ResNet groups (group-pivoted order): with the correlation permuted into
  the selection order, ``P C Pᵀ = L Lᵀ``, eliminating the first r channels leaves the Schur complement
  ``L[:, r:] L[:, r:]ᵀ``, so the residual ``tr(Aᵀ (C − C[:,S] C[S,S]⁻¹ C[S,:]) A)`` of the first r channels is
  ``Σ_{j≥r} ‖Aₚᵀ l_j‖²``: one Cholesky gives the error at every prefix width.

Curves are relative (error at rank r over the error at rank 0), indexed by rank 0..max.
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


def module_curves(unet, stats, scored: dict[str, dict], dcfg, device=None, factors=None) -> dict[str, torch.Tensor]:
    """Relative whitened error at every rank ``0..max_rank`` of each scored module (``allocate.api.score_modules``).

    Uses the decompositions' own statistics (time-aggregated with each module's timestep weights as the plan
    records them, ridged) and selection orders, so the curve at the planned rank is the error the decomposition
    then has. ``factors`` (a :class:`~slimexport.decompose.api.Factorisations`) keeps the factorisations for the
    decomposition.
    """
    from slimexport.allocate.api import max_rank
    from slimexport.allocate.scores import plan_weights
    from slimexport.decompose import resnet_nystrom
    from slimexport.decompose.api import Factorisations

    device = torch.device(device) if device is not None else next(unet.parameters()).device
    factors = factors if factors is not None else Factorisations()

    def w(layer) -> torch.Tensor:
        return layer.weight.detach().to(device=device, dtype=torch.float64)

    last = {s["block"].path: name for name, s in scored.items()}  # after it, the block's whitener is released
    out = {}
    for name, s in scored.items():
        block, kind = s["block"], s["kind"]
        bw = torch.tensor(plan_weights(s["ms"].bin_weights), dtype=torch.float64)
        W = factors.whitener(stats, block, dcfg, device)
        mod = unet.get_submodule(block.path)
        f = factors.factorise(name, mod, kind, W, bw, dcfg, device)
        if kind == "ff":  # f: the channel order
            curve = relative(prefix_errors(W.corr("z", bw), f, w(mod.ff.net[2]).T))
        elif kind == "resnet":  # f: the group order
            g = block.group_size
            a = resnet_nystrom.conv2_matrix(w(mod.conv2))
            curve = relative(prefix_errors(W.corr("r", bw), resnet_nystrom.group_channels(f, g), a))[::g]  # rank = groups kept
        elif kind in ("proj_in", "proj_out"):  # rank up to the break-even rank, where the layer stays dense
            d = max_rank(block, kind)
            curve = relative(tail_sums(f.sigma**2))[: d + 1].clone()
            curve[d] = 0.0
        else:  # attention pairs: HeadFactors
            curve = relative(f.errors())
        out[name] = curve.detach().cpu()
        if last[block.path] == name:
            W.release()
    return out
