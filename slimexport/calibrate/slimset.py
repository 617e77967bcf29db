"""Stage A: SlimSet, a small diverse calibration prompt set (method §3).

Prompts are embedded with the model's own text encoder (pooled output, L2-normalised). The set starts at the
prompt nearest the geometric median of the pool and grows by farthest-point sampling in cosine distance.
With tagged groups (``low_f`` smooth/flat scenes, ``high_f`` texture and detail), each group fills its quota.
"""

from __future__ import annotations

import torch

# Weiszfeld iteration limits (method §3: 100 iterations or ‖Δμ‖ < 1e-6).
WEISZFELD_ITERS = 100
WEISZFELD_TOL = 1e-6
DIST_FLOOR = 1e-8


def geometric_median(e: torch.Tensor, iters: int = WEISZFELD_ITERS, tol: float = WEISZFELD_TOL) -> torch.Tensor:
    """``argmin_μ Σ_i ‖e_i − μ‖₂`` by Weiszfeld iterations from the mean. ``e``: ``[N, D]``."""
    e = e.double()
    mu = e.mean(0)
    for _ in range(iters):
        d = (e - mu).norm(dim=1).clamp_min(DIST_FLOOR)
        w = 1.0 / d
        new = (w[:, None] * e).sum(0) / w.sum()
        if float((new - mu).norm()) < tol:
            return new
        mu = new
    return mu


def farthest_point_sampling(e: torch.Tensor, k: int, start: int) -> list[int]:
    """Greedy k-centre in cosine distance ``1 − e_iᵀe_j`` on unit vectors, from index ``start``."""
    n = e.shape[0]
    k = min(k, n)
    chosen = [start]
    dist = 1.0 - e @ e[start]
    dist[start] = -1.0
    while len(chosen) < k:
        i = int(torch.argmax(dist))
        chosen.append(i)
        dist = torch.minimum(dist, 1.0 - e @ e[i])
        dist[chosen] = -1.0
    return chosen


def select(embeddings: torch.Tensor, k: int) -> list[int]:
    """SlimSet indices: nearest to the geometric median first, then farthest-point sampling."""
    e = torch.nn.functional.normalize(embeddings.double(), dim=1)
    mu = geometric_median(e)
    start = int(torch.argmin((e - mu).norm(dim=1)))
    return farthest_point_sampling(e, k, start)


def select_grouped(embeddings: torch.Tensor, groups: list[str], k: int) -> list[int]:
    """SlimSet with equal quotas per tag (remainder to the first groups); untagged pools use :func:`select`."""
    names = sorted(set(groups))
    if len(names) <= 1:
        return select(embeddings, k)
    k = min(k, len(groups))
    quota = {g: k // len(names) + (1 if i < k % len(names) else 0) for i, g in enumerate(names)}
    out: list[int] = []
    spill = 0
    for g in names:
        idx = [i for i, t in enumerate(groups) if t == g]
        want = min(quota[g] + spill, len(idx))
        spill = quota[g] + spill - want
        out += [idx[j] for j in select(embeddings[idx], want)]
    if spill:
        rest = [i for i in range(len(groups)) if i not in set(out)]
        out += [rest[j] for j in select(embeddings[rest], spill)]
    return out
