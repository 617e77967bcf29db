"""ResNet inner channels by group-pivoted Nyström selection (beyond the paper; method notes §13).

In a ``ResnetBlock2D`` the inner channels ``h = SiLU(GroupNorm(conv1(x) + temb))`` feed ``conv2``. They play
the part of the FFN's intermediate width, with two differences:

1. GroupNorm normalises channels in groups. Keeping or removing *whole groups* keeps every kept channel's
   normalisation exact (a group's mean and variance do not depend on other groups), so selection works on
   groups, not single channels.
2. ``conv2`` mixes neighbouring pixels. With the channel correlation ``C = E[h hᵀ]`` over all pixels, the
   least-squares reconstruction of the removed channels from the kept set ``S``, ``h ≈ T h_S`` with
   ``T = C[:,S] C[S,S]⁻¹``, is the same at every pixel, so it commutes with the spatial taps and folds into
   ``conv2``'s input weights:

       W2'[:, S, kh, kw] = Σ_c W2[:, c, kh, kw] · T[c, S].

The result is an ordinary, narrower ResNet block (no extra layers). Groups are ordered greedily by block
pivoted Cholesky on ``C``: pick the group with the largest residual trace, take its Schur complement, repeat;
with all groups kept, ``T = I`` and the block is unchanged.
"""

from __future__ import annotations

import torch

from slimexport.decompose.linalg import trace_form


def group_pivoted_order(c: torch.Tensor, group_size: int) -> torch.Tensor:
    """Greedy order of the groups of consecutive channels (block pivoted Cholesky on ``c``, fp64)."""
    n = c.shape[0]
    groups = n // group_size
    r = c.double().clone()
    remaining = torch.ones(groups, dtype=torch.bool)
    order = []
    eye = torch.eye(group_size, dtype=r.dtype, device=r.device)
    for _ in range(groups):
        diag = torch.diagonal(r).reshape(groups, group_size).sum(1).cpu()
        diag[~remaining] = -float("inf")
        g = int(torch.argmax(diag))
        order.append(g)
        remaining[g] = False
        sl = slice(g * group_size, (g + 1) * group_size)
        rgg = r[sl, sl]
        scale = float(torch.diagonal(rgg).mean().clamp_min(1e-300))
        L, info = torch.linalg.cholesky_ex(rgg + 1e-12 * scale * eye)
        if int(info) != 0:
            continue  # this group adds nothing new: its residual is (numerically) zero
        rg = torch.linalg.solve_triangular(L, r[sl, :], upper=False)  # L⁻¹ R[g,:]
        r = r - rg.T @ rg
    return torch.tensor(order, dtype=torch.long)


def group_channels(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    """Channel indices of the given groups of consecutive channels, in the groups' order."""
    return (groups[:, None] * group_size + torch.arange(group_size)[None, :]).reshape(-1)


def kept_channels(order: torch.Tensor, keep_groups: int, group_size: int) -> torch.Tensor:
    """Sorted channel indices of the first ``keep_groups`` groups of ``order``."""
    return group_channels(torch.sort(order[:keep_groups]).values, group_size)


def reconstruction(c: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``T = C[:, S] C[S, S]⁻¹`` (``[n, |S|]``), by a Cholesky solve."""
    css = c[keep][:, keep]
    L, info = torch.linalg.cholesky_ex(css)
    rhs = c[keep, :]  # C[S, :] = C[:, S]ᵀ
    sol = torch.cholesky_solve(rhs, L) if int(info) == 0 else torch.linalg.lstsq(css, rhs).solution
    return sol.T


def fold_conv2(w2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``W2'[o, s, kh, kw] = Σ_c W2[o, c, kh, kw] T[c, s]``."""
    return torch.einsum("ockl,cs->oskl", w2, t.to(w2.dtype))


def conv2_matrix(w2: torch.Tensor) -> torch.Tensor:
    """``A[c, (o,kh,kw)] = W2[o, c, kh, kw]``: conv2 as a map from its input channels (taps treated as outputs)."""
    return w2.permute(1, 0, 2, 3).reshape(w2.shape[1], -1)


def residual(c: torch.Tensor, keep: torch.Tensor, w2: torch.Tensor, t: torch.Tensor | None = None) -> float:
    """``tr(Aᵀ (C − C[:,S] C[S,S]⁻¹ C[S,:]) A)`` with ``A`` = :func:`conv2_matrix` of ``w2``.

    ``t``: :func:`reconstruction` of ``keep`` where the caller has it already."""
    t = reconstruction(c, keep) if t is None else t
    return trace_form(c - t @ c[keep, :], conv2_matrix(w2))
