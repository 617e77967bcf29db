"""Type II (query-key) and Type III (value-output) whitening-SVD, per head.

Both approximate a per-head *product* of two weight matrices ``M = A₁ A₂ᵀ`` (rank ≤ d) by a rank-r product
``Â₁ Â₂ᵀ`` that is optimal in an activation-weighted norm. With input correlations ``C₁ = L₁ L₁ᵀ`` (rows of
``M``) and ``C₂ = L₂ L₂ᵀ`` (columns of ``M``; the identity for VO, where the output side is not weighted):

    E(M̂) = tr((M − M̂)ᵀ C₁ (M − M̂) C₂) = ‖L₁ᵀ (M − M̂) L₂‖²_F.

Substituting ``G = L₁ᵀ M L₂`` turns this into plain low-rank approximation of ``G``; Eckart–Young gives
``Ĝ = U_r Σ_r V_rᵀ`` and the error ``Σ_{i>r} σ_i²``. Mapping back,

    Â₁ = L₁⁻ᵀ U_r Σ_r^{1/2},   Â₂ = L₂⁻ᵀ V_r Σ_r^{1/2}   (Σ^{1/2} on both sides, for fp16 range).

``G`` is ``(L₁ᵀA₁)(L₂ᵀA₂)ᵀ``, a product of two thin matrices (n × d), so its SVD comes from the QR of each
factor and the SVD of a d × d core: ``L₁ᵀA₁ = Q₁R₁``, ``L₂ᵀA₂ = Q₂R₂``, ``R₁R₂ᵀ = u s vᵀ``,
``U = Q₁u``, ``V = Q₂v``. For QK, ``A₁ = A_Q,h``, ``A₂ = A_K,h``, and the logits ``x_q M x_kᵀ`` keep their
scale. For VO, ``A₁ = A_V,h`` and ``A₂ = A_O,hᵀ`` (so ``M = A_V,h A_O,h``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimexport.decompose.linalg import whiten_solve


@dataclass
class HeadFactors:
    """Per-head factors of one module, fp64.

    Attributes:
        left: ``[H, n1, d]`` whitened-space left factors ``L₁⁻ᵀ U Σ^{1/2}`` for all d singular directions.
        right: ``[H, n2, d]`` likewise ``L₂⁻ᵀ V Σ^{1/2}``.
        sigma: ``[H, d]`` singular values of ``G_h``, descending.
    """

    left: torch.Tensor
    right: torch.Tensor
    sigma: torch.Tensor

    def truncate(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Â₁ [H, n1, r], Â₂ [H, n2, r])`` keeping the top ``rank`` directions of every head."""
        return self.left[..., :rank], self.right[..., :rank]

    def error(self, rank: int) -> torch.Tensor:
        """Whitened error ``Σ_h Σ_{i>r} σ_{h,i}²`` at per-head ``rank``."""
        return (self.sigma[:, rank:] ** 2).sum()

    def errors(self) -> torch.Tensor:
        """Error at every rank 0..d: ``[d + 1]``."""
        s2 = (self.sigma**2).sum(0)
        tail = torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0])
        return torch.cat([tail, tail.new_zeros(1)])


def whitened_product_svd(a1: torch.Tensor, a2: torch.Tensor, L1: torch.Tensor | None, L2: torch.Tensor | None) -> HeadFactors:
    """Factor ``M_h = A₁,h A₂,hᵀ`` for every head in whitened coordinates.

    Args:
        a1: ``[H, n1, d]`` left weights per head (math convention, fp64).
        a2: ``[H, n2, d]`` right weights per head.
        L1: ``[n1, n1]`` lower Cholesky factor of the left correlation, or ``None`` for the identity.
        L2: ``[n2, n2]`` likewise for the right side.
    """
    w1 = a1 if L1 is None else L1.transpose(-2, -1) @ a1
    w2 = a2 if L2 is None else L2.transpose(-2, -1) @ a2
    q1, r1 = torch.linalg.qr(w1)
    q2, r2 = torch.linalg.qr(w2)
    u, s, vh = torch.linalg.svd(r1 @ r2.transpose(-2, -1))
    root = s.clamp_min(0).sqrt()
    U = q1 @ u * root[:, None, :]
    V = q2 @ vh.transpose(-2, -1) * root[:, None, :]
    left = U if L1 is None else whiten_solve(L1, U)
    right = V if L2 is None else whiten_solve(L2, V)
    return HeadFactors(left=left, right=right, sigma=s)


def split_heads_in(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """torch ``[H·d, n]`` weight → math ``[H, n, d]`` per-head input-side factors."""
    hd, n = weight.shape
    return weight.reshape(heads, hd // heads, n).transpose(1, 2)


def merge_heads_in(a: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_heads_in`: ``[H, n, r]`` → torch ``[H·r, n]``."""
    h, n, r = a.shape
    return a.transpose(1, 2).reshape(h * r, n)


def qk_factors(w_q: torch.Tensor, w_k: torch.Tensor, heads: int, L_q: torch.Tensor | None, L_k: torch.Tensor | None) -> HeadFactors:
    """Type II: query/key torch weights ``[H·d, n_q]``, ``[H·d, n_k]`` → per-head factors of ``A_Q,h A_K,hᵀ``."""
    return whitened_product_svd(split_heads_in(w_q, heads), split_heads_in(w_k, heads), L_q, L_k)


def vo_factors(w_v: torch.Tensor, w_o: torch.Tensor, heads: int, L_v: torch.Tensor | None) -> HeadFactors:
    """Type III: value ``[H·d, n]`` and output ``[C_out, H·d]`` torch weights → per-head factors of ``A_V,h A_O,h``.

    The output side is unweighted (its input is the attention output; the residual stream takes it as is).
    """
    c_out, hd = w_o.shape
    a_o = w_o.reshape(c_out, heads, hd // heads).permute(1, 0, 2)  # [H, C_out, d] = A_O,hᵀ
    return whitened_product_svd(split_heads_in(w_v, heads), a_o, L_v, None)


def vo_weights(f: HeadFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated VO factors as torch weights ``(to_v [H·r, n], to_out [C_out, H·r])``."""
    left, right = f.truncate(rank)
    h, c_out, r = right.shape
    return merge_heads_in(left), right.permute(1, 0, 2).reshape(c_out, h * r)


def qk_weights(f: HeadFactors, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated QK factors as torch weights ``(to_q [H·r, n_q], to_k [H·r, n_k])``."""
    left, right = f.truncate(rank)
    return merge_heads_in(left), merge_heads_in(right)
