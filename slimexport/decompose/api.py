"""Stage D driver: closed-form decompositions of every planned module, written into a copy of the UNet.

All factorisations run in fp64 (on the UNet's device; pivoted Cholesky on the CPU through LAPACK) and are
cast to the UNet's dtype at the end. Every module is computed from the *dense* model's statistics.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from slimexport.allocate.scores import aggregate
from slimexport.calibrate.stats import CalibStats
from slimexport.config import DecomposeConfig
from slimexport.decompose import ffn_nystrom as ffn
from slimexport.decompose import resnet_nystrom
from slimexport.decompose.linalg import check_finite, cholesky, ridge, trace_form
from slimexport.decompose.proj_svd import proj_factors
from slimexport.decompose.whiten_svd import HeadFactors, qk_factors, qk_weights, vo_factors, vo_weights
from slimexport.models.arch import FFN_KIND, PROJ_KINDS, RESNET_KIND, BlockInfo, ProjInfo, ResnetInfo
from slimexport.slim.apply import install_processors, replace_linears
from slimexport.slim.lowrank import dense_weight, factor_layer

log = logging.getLogger(__name__)


def _weights_of(plan: dict, name: str) -> torch.Tensor | None:
    w = plan["modules"].get(name, {}).get("timestep_weights")
    return None if w is None else torch.tensor(w, dtype=torch.float64)


# Input statistics of each attention: (query side, key/value side). The text tokens ``e`` are not binned.
ATTN_INPUTS = {"attn1": ("x", "x"), "attn2": ("y", "e")}


class _Whitener:
    """Cholesky factors of ridged, time-aggregated correlations, cached per (statistic, weighting).

    Timestep weights are ignored for statistics collected over all steps together (the text tokens)."""

    def __init__(self, stats: CalibStats, block: BlockInfo, cfg: DecomposeConfig, device):
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


def factorise(mod, kind: str, W: _Whitener, bin_weights: torch.Tensor | None, cfg: DecomposeConfig, device):
    """One module's factorisation at every rank, the part the error curves and the decomposition share.

    Args:
        mod: the module holding it (transformer block, ResNet block or transformer); ``kind``: ``attn1.qk``,
            ``attn1.vo``, ``attn2.qk``, ``attn2.vo``, ``ff``, ``resnet``, ``proj_in`` or ``proj_out``.
        W: the whitener of ``mod``'s statistics; ``bin_weights``: the plan's timestep weights of the module.

    Returns:
        :class:`HeadFactors` (attention pairs; plain weight SVD unless ``qkvo_method`` is ``whiten``), the channel
        selection order (``ff``), the group order (``resnet``) or :class:`ProjFactors` (projections).
    """
    whiten = cfg.qkvo_method == "whiten"

    def w(layer) -> torch.Tensor:
        return layer.weight.detach().to(device=device, dtype=torch.float64)

    def chol(key: str) -> torch.Tensor | None:
        return W.chol(key, bin_weights) if whiten else None

    if kind == FFN_KIND:
        return ffn_order(W.corr("z", bin_weights), cfg)
    if kind == RESNET_KIND:
        return resnet_nystrom.group_pivoted_order(W.corr("r", bin_weights), W.block.group_size)
    if kind in PROJ_KINDS:
        weight = dense_weight(getattr(mod, kind))[0].detach().to(device=device, dtype=torch.float64)
        return proj_factors(weight, chol("pi" if kind == "proj_in" else "po"))
    which, pair = kind.split(".")
    attn = getattr(mod, which)
    q_key, kv_key = ATTN_INPUTS[which]
    if pair == "qk":
        return qk_factors(w(attn.to_q), w(attn.to_k), attn.heads, chol(q_key), chol(kv_key))
    return vo_factors(w(attn.to_v), w(attn.to_out[0]), attn.heads, chol(kv_key))


def ffn_order(c: torch.Tensor, cfg: DecomposeConfig) -> torch.Tensor:
    """The FFN channels' selection order from their correlation (``cpqr`` or ``leverage``)."""
    return ffn.pivoted_cholesky_order(c) if cfg.ffn_selection == "cpqr" else ffn.leverage_order(c)


class Factorisations:
    """The factorisations of one compress run: made once for the greedy allocation's error curves, then taken
    by the decomposition (which would otherwise factor every module a second time).

    Holds each module's :func:`factorise` result keyed by module name and timestep weights, and each block's
    :class:`_Whitener` (its Cholesky fallbacks are counted once, there; the curves release its cached matrices once
    the block is done, and the decomposition remakes the few it needs). The decomposition takes (removes) what
    it uses, releasing memory block by block. Valid for one UNet, one set of statistics, one config, one device.
    """

    def __init__(self):
        self._whiteners: dict[str, _Whitener] = {}
        self._made: dict[tuple, Any] = {}
        self.reused = 0

    def whitener(self, stats: CalibStats, block, cfg: DecomposeConfig, device, take: bool = False) -> _Whitener:
        """The block's whitener: kept for later, or (``take``) handed over and forgotten."""
        if take:
            return self._whiteners.pop(block.path, None) or _Whitener(stats, block, cfg, device)
        return self._whiteners.setdefault(block.path, _Whitener(stats, block, cfg, device))

    def factorise(self, name: str, mod, kind: str, W: _Whitener, bin_weights: torch.Tensor | None,
                  cfg: DecomposeConfig, device, take: bool = False) -> Any:
        """:func:`factorise`, made once: kept for later, or (``take``) handed over and forgotten."""
        key = (name, None if bin_weights is None else tuple(bin_weights.tolist()))
        if key in self._made:
            self.reused += int(take)
            return self._made.pop(key) if take else self._made[key]
        made = factorise(mod, kind, W, bin_weights, cfg, device)
        if not take:
            self._made[key] = made
        return made


def _random_factors(w1: torch.Tensor, w2: torch.Tensor, heads: int, seed: int, vo: bool) -> HeadFactors:
    """Baseline: a random orthonormal r-dim subspace of each head (no activations, no spectrum)."""
    from slimexport.decompose.whiten_svd import split_heads_in

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


def decompose_block(unet, block: BlockInfo, stats: CalibStats, plan: dict, cfg: DecomposeConfig, device,
                    factors: Factorisations) -> tuple[dict, dict]:
    """New weights (torch layout, fp64) for every planned module of one block, and each module's relative error.

    The relative error is the whitened error at the planned rank over the error at rank 0 (for ``whiten``
    and ``cpqr``/``leverage``), the quantity the closed forms minimise. ``factors``: what the error curves
    factored already is taken from there instead of factored again (an empty one: everything is factored here).
    """
    ranks = plan["ranks"]
    mod = unet.get_submodule(block.path)
    W = factors.whitener(stats, block, cfg, device, take=True)
    new: dict[str, torch.Tensor] = {}
    errs: dict[str, float] = {}
    seed = cfg.seed + sum(map(ord, block.path))

    def w(linear) -> torch.Tensor:
        return linear.weight.detach().to(device=device, dtype=torch.float64)

    for name in ATTN_INPUTS:
        attn = getattr(mod, name)
        qk_id, vo_id = f"{block.path}.{name}.qk", f"{block.path}.{name}.vo"
        if qk_id in ranks:
            bw = _weights_of(plan, qk_id)
            if cfg.qkvo_method == "random":
                f = _random_factors(w(attn.to_q), w(attn.to_k), attn.heads, seed, vo=False)
            else:
                f = factors.factorise(qk_id, mod, f"{name}.qk", W, bw, cfg, device, take=True)
            q, k = qk_weights(f, ranks[qk_id])
            new[f"{block.path}.{name}.to_q.weight"], new[f"{block.path}.{name}.to_k.weight"] = q, k
            errs[qk_id] = _rel(f, ranks[qk_id])
        if vo_id in ranks:
            bw = _weights_of(plan, vo_id)
            if cfg.qkvo_method == "random":
                f = _random_factors(w(attn.to_v), w(attn.to_out[0]), attn.heads, seed + 1, vo=True)
            else:
                f = factors.factorise(vo_id, mod, f"{name}.vo", W, bw, cfg, device, take=True)
            v, o = vo_weights(f, ranks[vo_id])
            new[f"{block.path}.{name}.to_v.weight"], new[f"{block.path}.{name}.to_out.0.weight"] = v, o
            errs[vo_id] = _rel(f, ranks[vo_id])
    ff_id = f"{block.path}.ff"
    if ff_id in ranks:
        proj, down = mod.ff.net[0].proj, mod.ff.net[2]
        w1, b1, w2 = w(proj), proj.bias.detach().to(device=device, dtype=torch.float64), w(down)
        width = ranks[ff_id]
        if cfg.ffn_selection in ("weight", "random"):
            order = ffn.weight_norm_order(w2) if cfg.ffn_selection == "weight" else ffn.random_order(w2.shape[1], seed + 2)
            keep = torch.sort(order[:width]).values.to(device)
            nw1, nb1, nw2 = w1[torch.cat([keep, keep + w2.shape[1]])], b1[torch.cat([keep, keep + w2.shape[1]])], w2[:, keep]
            errs[ff_id] = float("nan")
        else:
            bw = _weights_of(plan, ff_id)
            c = W.corr("z", bw)
            order = factors.factorise(ff_id, mod, FFN_KIND, W, bw, cfg, device, take=True).to(device)
            nw1, nb1, nw2 = ffn.ffn_slim_weights(w1, b1, w2, c, order, width)
            total = ffn.total_energy(c, w2)
            rest = ffn.residual(c, ffn.kept_channels(order, width), nw2, total)  # from the solve just made
            errs[ff_id] = rest / total if total > 0 else 0.0
        new[f"{ff_id}.net.0.proj.weight"], new[f"{ff_id}.net.0.proj.bias"], new[f"{ff_id}.net.2.weight"] = nw1, nb1, nw2
    for k, t in new.items():
        check_finite(t, f"decomposed weight {k}")
    return new, {"rel_error": errs, "cholesky_fallbacks": W.fallbacks}


def decompose_resnet(unet, r: ResnetInfo, stats: CalibStats, plan: dict, cfg: DecomposeConfig, device,
                     factors: Factorisations) -> tuple[dict, dict]:
    """Group-pivoted Nyström of one ResNet block's inner channels at the planned number of groups."""
    name = f"{r.path}.{RESNET_KIND}"
    keep_groups = plan["ranks"][name]
    mod = unet.get_submodule(r.path)
    bw = _weights_of(plan, name)
    W = factors.whitener(stats, r, cfg, device, take=True)
    c = W.corr("r", bw)
    order = factors.factorise(name, mod, RESNET_KIND, W, bw, cfg, device, take=True)
    keep = resnet_nystrom.kept_channels(order, keep_groups, r.group_size).to(device)
    f64 = dict(device=device, dtype=torch.float64)
    w2 = mod.conv2.weight.detach().to(**f64)
    recon = resnet_nystrom.reconstruction(c, keep)  # C[:,S] C[S,S]⁻¹: folded into conv2 and read by the residual
    new = {
        f"{r.path}.conv1.weight": mod.conv1.weight.detach().to(**f64)[keep],
        f"{r.path}.conv1.bias": mod.conv1.bias.detach().to(**f64)[keep],
        f"{r.path}.norm2.weight": mod.norm2.weight.detach().to(**f64)[keep],
        f"{r.path}.norm2.bias": mod.norm2.bias.detach().to(**f64)[keep],
        f"{r.path}.conv2.weight": resnet_nystrom.fold_conv2(w2, recon),
    }
    if mod.time_emb_proj is not None:
        new[f"{r.path}.time_emb_proj.weight"] = mod.time_emb_proj.weight.detach().to(**f64)[keep]
        new[f"{r.path}.time_emb_proj.bias"] = mod.time_emb_proj.bias.detach().to(**f64)[keep]
    total = trace_form(c, resnet_nystrom.conv2_matrix(w2))
    rel = resnet_nystrom.residual(c, keep, w2, recon) / total if total > 0 else 0.0
    for k, t in new.items():
        check_finite(t, f"decomposed weight {k}")
    return new, {"rel_error": {name: max(rel, 0.0)}}


def decompose_proj(unet, t: ProjInfo, stats: CalibStats, plan: dict, cfg: DecomposeConfig, device,
                   factors: Factorisations) -> tuple[dict, dict]:
    """Whitened-SVD factors ``(U, V, bias)`` of each planned projection of one transformer below its break-even rank.

    A projection planned at its break-even rank (``max_rank``) stays dense and is not returned."""
    mod = unet.get_submodule(t.path)
    W = factors.whitener(stats, t, cfg, device, take=True)
    new, errs = {}, {}
    for kind in PROJ_KINDS:
        name = f"{t.path}.{kind}"
        if name not in plan["ranks"]:
            continue
        rank = plan["ranks"][name]
        if rank >= plan["modules"][name]["max_rank"]:
            errs[name] = 0.0
            continue
        f = factors.factorise(name, mod, kind, W, _weights_of(plan, name), cfg, device, take=True)
        u, v = f.truncate(rank)
        b = dense_weight(getattr(mod, kind))[1]
        bias = None if b is None else b.detach().to(device=device, dtype=torch.float64)
        for part, x in (("u", u), ("v", v), ("bias", bias)):
            if x is not None:
                check_finite(x, f"decomposed weight {name}.{part}")
        new[name] = (u, v, bias)
        errs[name] = f.rel_error(rank)
    return new, {"rel_error": errs, "cholesky_fallbacks": W.fallbacks}


def _rel(f: HeadFactors, rank: int) -> float:
    total = float(f.error(0))
    return float(f.error(rank)) / total if total > 0 else 0.0


def slim_unet(unet, stats: CalibStats, plan: dict, cfg: DecomposeConfig, device=None, progress: bool = True,
              factors: Factorisations | None = None):
    """A slim copy of ``unet`` with every planned module replaced by its decomposition at the planned rank.

    Args:
        factors: the factorisations the greedy allocation's error curves made (:func:`module_curves`) for this
            UNet, statistics, config and device: taken from there, not made again.

    Returns:
        ``(slim_unet, diagnostics)``; diagnostics hold per-module relative errors, Cholesky fallbacks and the
        number of factorisations reused.
    """
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    factors = factors if factors is not None else Factorisations()
    slim = copy.deepcopy(unet)
    diag = {"rel_error": {}, "cholesky_fallbacks": 0}
    blocks = stats.blocks
    it = blocks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(blocks, desc="decompose", unit="block", dynamic_ncols=True)
    for block in it:
        new, d = decompose_block(unet, block, stats, plan, cfg, device, factors)
        replace_linears(slim, new)
        diag["rel_error"].update(d["rel_error"])
        diag["cholesky_fallbacks"] += d["cholesky_fallbacks"]
    for r in stats.resnets:
        if f"{r.path}.{RESNET_KIND}" in plan["ranks"]:
            new, d = decompose_resnet(unet, r, stats, plan, cfg, device, factors)
            replace_linears(slim, new)
            diag["rel_error"].update(d["rel_error"])
    for t in stats.projs:
        if any(f"{t.path}.{k}" in plan["ranks"] for k in PROJ_KINDS):
            new, d = decompose_proj(unet, t, stats, plan, cfg, device, factors)
            parent = slim.get_submodule(t.path)
            for name, (u, v, b) in new.items():
                factor_layer(parent, name.rsplit(".", 1)[1], u, v, b)
            diag["rel_error"].update(d["rel_error"])
            diag["cholesky_fallbacks"] += d["cholesky_fallbacks"]
    if diag["cholesky_fallbacks"]:
        log.warning("%d correlation(s) were ill-conditioned and needed the Cholesky fallback (eigenvalue shift)",
                    diag["cholesky_fallbacks"])
    diag["factorisations_reused"] = factors.reused
    install_processors(slim)
    return slim.eval().requires_grad_(False), diag
