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

import torch

from slimexport.decompose.linalg import cholesky


def prefix_errors(c: torch.Tensor, order: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``err[r] = tr(Aᵀ (C − C[:,S_r] C[S_r,S_r]⁻¹ C[S_r,:]) A)`` for ``S_r = order[:r]``, ``r = 0..n`` (fp64).

    Args:
        c: ``[n, n]`` positive definite correlation; order: a permutation of ``0..n-1``; a: ``[n, m]``.
    """
    p = order.to(c.device)
    L, _ = cholesky(c[p][:, p], "correlation (error curve)")
    e = ((a.to(c.dtype)[p].T @ L) ** 2).sum(0)  # energy each pivot column carries
    return tail_sums(e)


def tail_sums(e: torch.Tensor) -> torch.Tensor:
    """``out[r] = Σ_{j≥r} e_j`` for ``r = 0..n`` (``out[n] = 0``): the error left when the first r terms are kept."""
    tail = torch.flip(torch.cumsum(torch.flip(e, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)])


def relative(err: torch.Tensor) -> torch.Tensor:
    total = float(err[0])
    return err / total if total > 0 else torch.zeros_like(err)


def module_curves(unet, stats, scored: dict[str, dict], dcfg, device=None) -> dict[str, torch.Tensor]:
    """Relative whitened error at every rank ``0..max_rank`` of each scored module (``allocate.api.score_modules``).

    Uses the decompositions' own statistics (time-aggregated with each module's timestep weights, ridged) and
    selection orders, so the curve at the planned rank is the error the decomposition then has.
    """
    from slimexport.allocate.api import max_rank
    from slimexport.decompose import ffn_nystrom as ffn
    from slimexport.decompose import resnet_nystrom
    from slimexport.decompose.api import ATTN_INPUTS, _Whitener
    from slimexport.decompose.proj_svd import proj_factors
    from slimexport.decompose.whiten_svd import qk_factors, vo_factors
    from slimexport.slim.lowrank import dense_weight

    device = torch.device(device) if device is not None else next(unet.parameters()).device
    whiteners: dict[str, _Whitener] = {}
    out = {}
    for name, s in scored.items():
        block, kind = s["block"], s["kind"]
        bw = s["ms"].bin_weights
        W = whiteners.setdefault(block.path, _Whitener(stats, block, dcfg, device))
        mod = unet.get_submodule(block.path)

        def w(layer) -> torch.Tensor:
            return layer.weight.detach().to(device=device, dtype=torch.float64)

        if kind in ("attn1.qk", "attn2.qk"):
            attn = getattr(mod, kind.split(".")[0])
            q_key, kv_key = ATTN_INPUTS[kind.split(".")[0]]
            f = qk_factors(w(attn.to_q), w(attn.to_k), attn.heads, W.chol(q_key, bw), W.chol(kv_key, bw))
            curve = relative(f.errors())
        elif kind in ("attn1.vo", "attn2.vo"):
            attn = getattr(mod, kind.split(".")[0])
            kv_key = ATTN_INPUTS[kind.split(".")[0]][1]
            f = vo_factors(w(attn.to_v), w(attn.to_out[0]), attn.heads, W.chol(kv_key, bw))
            curve = relative(f.errors())
        elif kind == "ff":
            c = W.corr("z", bw)
            order = ffn.pivoted_cholesky_order(c) if dcfg.ffn_selection == "cpqr" else ffn.leverage_order(c)
            curve = relative(prefix_errors(c, order, w(mod.ff.net[2]).T))
        elif kind == "resnet":
            c = W.corr("r", bw)
            g = block.group_size
            channels = resnet_nystrom.group_channels(resnet_nystrom.group_pivoted_order(c, g), g)
            w2 = w(mod.conv2)
            a = w2.permute(1, 0, 2, 3).reshape(w2.shape[1], -1)
            curve = relative(prefix_errors(c, channels, a))[::g]  # whole groups: rank = groups kept
        else:  # proj_in / proj_out: rank up to the break-even rank, where the layer stays dense
            f = proj_factors(dense_weight(getattr(mod, kind))[0].detach().to(device=device, dtype=torch.float64),
                             W.chol("pi" if kind == "proj_in" else "po", bw))
            d = max_rank(block, kind)
            curve = relative(tail_sums(f.sigma**2))[: d + 1].clone()
            curve[d] = 0.0
        out[name] = curve.detach().cpu()
    return out
