"""The closed forms by name, as the kinds table (``slimexport.models.kinds``) calls them.

Each ``Method`` does three things for a module of its kind:

- ``factorise``: the factorisation at every rank, shared by the error curves and the decomposition;
- ``curve``: the relative whitened error at every rank ``0..max_rank`` (greedy allocation, ``curves.py``);
- ``apply``: the new weights at the planned rank and the relative error there.

All run in fp64 on the decomposition's device; weights are read through the kind's layer roles, so no diffusers
name appears here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from slimexport.calibrate.stats import CalibStats, aggregate
from slimexport.config import DecomposeConfig
from slimexport.decompose import ffn_nystrom as ffn
from slimexport.decompose import resnet_nystrom
from slimexport.decompose.curves import prefix_errors, relative, tail_sums
from slimexport.decompose.linalg import check_finite, cholesky, ridge, trace_form
from slimexport.decompose.proj_svd import proj_factors
from slimexport.decompose.whiten_svd import (
    HeadFactors,
    qk_factors,
    qk_weights,
    split_heads_in,
    vo_factors,
    vo_weights,
)
from slimexport.models.kinds import Info, Kind
from slimexport.slim.lowrank import dense_weight


class Whitener:
    """Cholesky factors of ridged, time-aggregated correlations of one unit, cached per (statistic, weighting).

    Timestep weights are ignored for statistics collected over all steps together (the text tokens)."""

    def __init__(self, stats: CalibStats, block: Info, cfg: DecomposeConfig, device):
        self.stats, self.block, self.cfg, self.device = stats, block, cfg, device
        self.fallbacks = 0
        self._cache: dict = {}

    def _binned(self, key: str, bin_weights: torch.Tensor | None) -> torch.Tensor | None:
        return bin_weights if self.stats.corr[f"{self.block.path}.{key}"].dim() == 3 else None

    def corr(self, key: str, bin_weights: torch.Tensor | None) -> torch.Tensor:
        bin_weights = self._binned(key, bin_weights)
        ck = ("c", key, None if bin_weights is None else tuple(bin_weights.tolist()))
        if ck not in self._cache:
            if bin_weights is None:
                bin_weights = torch.full((self.stats.num_bins,), 1.0 / self.stats.num_bins, dtype=torch.float64)
            c = aggregate(self.stats, self.block, key, bin_weights).to(self.device)
            check_finite(c, f"time-aggregated correlation '{key}' of {self.block.path}")
            self._cache[ck] = ridge(c, self.cfg.ridge)
        return self._cache[ck]

    def chol(self, key: str, bin_weights: torch.Tensor | None) -> torch.Tensor:
        bin_weights = self._binned(key, bin_weights)
        ck = ("L", key, None if bin_weights is None else tuple(bin_weights.tolist()))
        if ck not in self._cache:
            L, fb = cholesky(self.corr(key, bin_weights), f"{self.block.path} '{key}' correlation")
            self.fallbacks += int(fb)
            self._cache[ck] = L
        return self._cache[ck]

    def release(self) -> None:
        """Forget the cached correlations and factors (remade on demand: the aggregation is cheap)."""
        self._cache.clear()


@dataclass
class Job:
    """One module to factor: its kind, unit info and module, the unit's whitener, its timestep weights."""

    kind: Kind
    info: Info
    mod: torch.nn.Module
    W: Whitener
    bin_weights: torch.Tensor | None
    cfg: DecomposeConfig
    device: Any

    @property
    def name(self) -> str:
        return self.kind.module_id(self.info)

    def weight(self, role: str) -> torch.Tensor:
        return self.kind.layer(self.mod, role).weight.detach().to(device=self.device, dtype=torch.float64)

    def bias(self, role: str) -> torch.Tensor | None:
        b = self.kind.layer(self.mod, role).bias
        return None if b is None else b.detach().to(device=self.device, dtype=torch.float64)

    def param(self, role: str, what: str = "weight") -> str:
        """The parameter's path in the UNet (``<unit>.<layer>.weight``)."""
        return f"{self.info.path}.{self.kind.layers[role]}.{what}"

    def chol(self, i: int) -> torch.Tensor | None:
        """The Cholesky factor of the kind's ``i``-th whitening statistic (``None`` unless ``qkvo_method=whiten``)."""
        return self.W.chol(self.kind.whiten[i], self.bin_weights) if self.cfg.qkvo_method == "whiten" else None

    def corr(self) -> torch.Tensor:
        return self.W.corr(self.kind.whiten[0], self.bin_weights)

    @property
    def seed(self) -> int:
        """Seed of the random baselines: the config's, plus the unit's path, plus the method's offset."""
        return self.cfg.seed + sum(map(ord, self.info.path)) + METHODS[self.kind.decomposition].seed_offset


@dataclass
class Applied:
    """A decomposition's result for one module: new weights by parameter path, or a factor pair ``(U, V, bias)``
    for the layer at ``factored[0]`` (parent path, attribute), and its relative error."""

    rel_error: float
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    factored: tuple | None = None


@dataclass(frozen=True)
class Method:
    factorise: Callable[[Job], Any]
    curve: Callable[[Job, Any], torch.Tensor]
    apply: Callable[[Job, int, Callable[[], Any]], Applied]
    seed_offset: int = 0


# --- attention pairs (Type II QK, Type III VO) ---------------------------------------------------------------------
def _rel(f: HeadFactors, rank: int) -> float:
    total = float(f.error(0))
    return float(f.error(rank)) / total if total > 0 else 0.0


def _random_factors(w1: torch.Tensor, w2: torch.Tensor, heads: int, seed: int, vo: bool) -> HeadFactors:
    """Baseline: a random orthonormal r-dim subspace of each head (no activations, no spectrum)."""
    a1 = split_heads_in(w1, heads)
    if vo:
        c_out, hd = w2.shape
        a2 = w2.reshape(c_out, heads, hd // heads).permute(1, 0, 2)
    else:
        a2 = split_heads_in(w2, heads)
    d = a1.shape[-1]
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(heads, d, d, generator=g, dtype=torch.float64))[0].to(a1.device)
    return HeadFactors(left=a1 @ q, right=a2 @ q, sigma=torch.zeros(heads, d, dtype=torch.float64, device=a1.device))


def _pair(vo: bool) -> Method:
    def factorise(j: Job) -> HeadFactors:
        if vo:
            return vo_factors(j.weight("left"), j.weight("right"), j.info.num_heads, j.chol(0))
        return qk_factors(j.weight("left"), j.weight("right"), j.info.num_heads, j.chol(0), j.chol(1))

    def apply(j: Job, rank: int, made: Callable[[], HeadFactors]) -> Applied:
        if j.cfg.qkvo_method == "random":
            f = _random_factors(j.weight("left"), j.weight("right"), j.info.num_heads, j.seed, vo=vo)
        else:
            f = made()
        left, right = (vo_weights if vo else qk_weights)(f, rank)
        return Applied(rel_error=_rel(f, rank), weights={j.param("left"): left, j.param("right"): right})

    return Method(factorise=factorise, curve=lambda j, f: relative(f.errors()), apply=apply, seed_offset=int(vo))


# --- FFN (Type I Nyström on the GEGLU channels) --------------------------------------------------------------------
def ffn_order(c: torch.Tensor, cfg: DecomposeConfig) -> torch.Tensor:
    """The FFN channels' selection order from their correlation (``cpqr`` or ``leverage``)."""
    return ffn.pivoted_cholesky_order(c) if cfg.ffn_selection == "cpqr" else ffn.leverage_order(c)


def _ffn_apply(j: Job, width: int, made: Callable[[], torch.Tensor]) -> Applied:
    w1, b1, w2 = j.weight("up"), j.bias("up"), j.weight("down")
    if j.cfg.ffn_selection in ("weight", "random"):
        order = ffn.weight_norm_order(w2) if j.cfg.ffn_selection == "weight" else ffn.random_order(w2.shape[1], j.seed)
        keep = torch.sort(order[:width]).values.to(j.device)
        both = torch.cat([keep, keep + w2.shape[1]])  # GEGLU: content rows, then the matching gate rows
        nw1, nb1, nw2, err = w1[both], b1[both], w2[:, keep], float("nan")
    else:
        c = j.corr()
        order = made().to(j.device)
        nw1, nb1, nw2 = ffn.ffn_slim_weights(w1, b1, w2, c, order, width)
        total = ffn.total_energy(c, w2)
        rest = ffn.residual(c, ffn.kept_channels(order, width), nw2, total)  # from the solve just made
        err = rest / total if total > 0 else 0.0
    return Applied(rel_error=err, weights={j.param("up"): nw1, j.param("up", "bias"): nb1, j.param("down"): nw2})


FFN_METHOD = Method(
    factorise=lambda j: ffn_order(j.corr(), j.cfg),
    curve=lambda j, order: relative(prefix_errors(j.corr(), order, j.weight("down").T)),
    apply=_ffn_apply, seed_offset=2,
)


# --- ResNet inner channels (group-pivoted Nyström) ------------------------------------------------------------------
def _resnet_curve(j: Job, order: torch.Tensor) -> torch.Tensor:
    g = j.info.group_size
    a = resnet_nystrom.conv2_matrix(j.weight("conv2"))
    return relative(prefix_errors(j.corr(), resnet_nystrom.group_channels(order, g), a))[::g]  # rank = groups kept


def _resnet_apply(j: Job, keep_groups: int, made: Callable[[], torch.Tensor]) -> Applied:
    c = j.corr()
    keep = resnet_nystrom.kept_channels(made(), keep_groups, j.info.group_size).to(j.device)
    w2 = j.weight("conv2")
    recon = resnet_nystrom.reconstruction(c, keep)  # C[:,S] C[S,S]⁻¹: folded into conv2 and read by the residual
    new = {j.param("conv1"): j.weight("conv1")[keep], j.param("conv1", "bias"): j.bias("conv1")[keep],
           j.param("norm"): j.weight("norm")[keep], j.param("norm", "bias"): j.bias("norm")[keep],
           j.param("conv2"): resnet_nystrom.fold_conv2(w2, recon)}
    if j.kind.layer(j.mod, "temb") is not None:
        new[j.param("temb")] = j.weight("temb")[keep]
        new[j.param("temb", "bias")] = j.bias("temb")[keep]
    total = trace_form(c, resnet_nystrom.conv2_matrix(w2))
    rel = resnet_nystrom.residual(c, keep, w2, recon) / total if total > 0 else 0.0
    return Applied(rel_error=max(rel, 0.0), weights=new)


RESNET_METHOD = Method(
    factorise=lambda j: resnet_nystrom.group_pivoted_order(j.corr(), j.info.group_size),
    curve=_resnet_curve, apply=_resnet_apply,
)


# --- transformer projections (whitened SVD factor pair) --------------------------------------------------------------
def _proj_factorise(j: Job):
    weight = dense_weight(j.kind.layer(j.mod, "layer"))[0].detach().to(device=j.device, dtype=torch.float64)
    return proj_factors(weight, j.chol(0))


def _proj_curve(j: Job, f) -> torch.Tensor:
    d = j.kind.max_rank(j.info)  # up to the break-even rank, where the layer stays dense
    curve = relative(tail_sums(f.sigma**2))[: d + 1].clone()
    curve[d] = 0.0
    return curve


def _proj_apply(j: Job, rank: int, made: Callable[[], Any]) -> Applied:
    if rank >= j.kind.max_rank(j.info):
        return Applied(rel_error=0.0)  # kept dense: no factors
    f = made()
    u, v = f.truncate(rank)
    b = dense_weight(j.kind.layer(j.mod, "layer"))[1]
    bias = None if b is None else b.detach().to(device=j.device, dtype=torch.float64)
    parent, _, attr = f"{j.info.path}.{j.kind.layers['layer']}".rpartition(".")
    return Applied(rel_error=f.rel_error(rank), factored=(parent, attr, u, v, bias))


PROJ_METHOD = Method(factorise=_proj_factorise, curve=_proj_curve, apply=_proj_apply)

METHODS: dict[str, Method] = {
    "qk_whiten_svd": _pair(vo=False),
    "vo_whiten_svd": _pair(vo=True),
    "ffn_nystrom": FFN_METHOD,
    "resnet_group_nystrom": RESNET_METHOD,
    "proj_whiten_svd": PROJ_METHOD,
}


def factorise(job: Job) -> Any:
    """One module's factorisation at every rank, the part the error curves and the decomposition share:
    :class:`HeadFactors` (attention pairs; plain weight SVD unless ``qkvo_method`` is ``whiten``), the channel
    selection order (FFN), the group order (ResNet) or :class:`ProjFactors` (projections)."""
    return METHODS[job.kind.decomposition].factorise(job)


class Factorisations:
    """The factorisations of one compress run: made once for the greedy allocation's error curves, then taken
    by the decomposition (which would otherwise factor every module a second time).

    Holds each module's :func:`factorise` result keyed by module name and timestep weights, and each unit's
    :class:`Whitener` (its Cholesky fallbacks are counted once, there; the curves release its cached matrices once
    the unit is done, and the decomposition remakes the few it needs). The decomposition takes (removes) what
    it uses, releasing memory unit by unit. Valid for one UNet, one set of statistics, one config, one device.
    """

    def __init__(self):
        self._whiteners: dict[str, Whitener] = {}
        self._made: dict[tuple, Any] = {}
        self.reused = 0

    def whitener(self, stats: CalibStats, block, cfg: DecomposeConfig, device, take: bool = False) -> Whitener:
        """The unit's whitener: kept for later, or (``take``) handed over and forgotten."""
        if take:
            return self._whiteners.pop(block.path, None) or Whitener(stats, block, cfg, device)
        return self._whiteners.setdefault(block.path, Whitener(stats, block, cfg, device))

    def factorise(self, job: Job, take: bool = False) -> Any:
        """:func:`factorise`, made once: kept for later, or (``take``) handed over and forgotten."""
        bw = job.bin_weights
        key = (job.name, None if bw is None else tuple(bw.tolist()))
        if key in self._made:
            self.reused += int(take)
            return self._made.pop(key) if take else self._made[key]
        made = factorise(job)
        if not take:
            self._made[key] = made
        return made


def check_applied(applied: Applied, name: str) -> None:
    for k, t in applied.weights.items():
        check_finite(t, f"decomposed weight {k}")
    if applied.factored is not None:
        for part, x in zip(("u", "v", "bias"), applied.factored[2:]):
            if x is not None:
                check_finite(x, f"decomposed weight {name}.{part}")
