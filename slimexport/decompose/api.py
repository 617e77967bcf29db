"""Stage D driver: closed-form decompositions of every planned module, written into a copy of the UNet.

All factorisations run in fp64 (on the UNet's device; pivoted Cholesky on the CPU through LAPACK) and are
cast to the UNet's dtype at the end. Every module is computed from the *dense* model's statistics. Units and
kinds come from the kinds table (``slimexport.models.kinds``); the closed forms from ``methods.METHODS``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping

import torch

from slimexport.calibrate.stats import CalibStats
from slimexport.config import DecomposeConfig
from slimexport.decompose.methods import METHODS, Factorisations, Job, check_applied
from slimexport.models.kinds import KINDS, UNITS, unit_kinds
from slimexport.plan import RankPlan, plan_weights
from slimexport.slim.apply import install_processors, replace_linears
from slimexport.slim.lowrank import factor_layer

log = logging.getLogger(__name__)

__all__ = ["Factorisations", "module_curves", "slim_unet"]


def _bin_weights(weights: list[float] | None) -> torch.Tensor | None:
    return None if weights is None else torch.tensor(weights, dtype=torch.float64)


def module_curves(unet, stats: CalibStats, scored: dict[str, dict], dcfg: DecomposeConfig, device=None,
                  factors: Factorisations | None = None) -> dict[str, torch.Tensor]:
    """Relative whitened error at every rank ``0..max_rank`` of each scored module (``allocate.api.score_modules``).

    Uses the decompositions' own statistics (time-aggregated with each module's timestep weights as the plan
    records them, ridged) and selection orders, so the curve at the planned rank is the error the decomposition
    then has. ``factors`` keeps the factorisations for the decomposition.
    """
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    factors = factors if factors is not None else Factorisations()
    last = {s["block"].path: name for name, s in scored.items()}  # after it, the unit's whitener is released
    out = {}
    for name, s in scored.items():
        info, kind = s["block"], KINDS[s["kind"]]
        bw = torch.tensor(plan_weights(s["ms"].bin_weights), dtype=torch.float64)
        W = factors.whitener(stats, info, dcfg, device)
        job = Job(kind, info, unet.get_submodule(info.path), W, bw, dcfg, device)
        out[name] = METHODS[kind.decomposition].curve(job, factors.factorise(job)).detach().cpu()
        if last[info.path] == name:
            W.release()
    return out


def decompose_unit(unet, info, kinds, stats: CalibStats, plan: Mapping, cfg: DecomposeConfig, device,
                   factors: Factorisations) -> tuple[list, dict, int]:
    """The planned modules of one unit at their planned ranks: ``(results, relative errors, Cholesky fallbacks)``.

    The relative error is the whitened error at the planned rank over the error at rank 0 (for ``whiten``
    and ``cpqr``/``leverage``), the quantity the closed forms minimise. ``factors``: what the error curves
    factored already is taken from there instead of factored again (an empty one: everything is factored here).
    """
    ranks = plan["ranks"]
    mod = unet.get_submodule(info.path)
    W = factors.whitener(stats, info, cfg, device, take=True)
    results, errs = [], {}
    for kind in kinds:
        name = kind.module_id(info)
        if name not in ranks:
            continue
        weights = plan["modules"].get(name, {}).get("timestep_weights")
        job = Job(kind, info, mod, W, _bin_weights(weights), cfg, device)
        applied = METHODS[kind.decomposition].apply(job, ranks[name], lambda job=job: factors.factorise(job, take=True))
        check_applied(applied, name)
        results.append(applied)
        errs[name] = applied.rel_error
    return results, errs, W.fallbacks


def slim_unet(unet, stats: CalibStats, plan: Mapping, cfg: DecomposeConfig, device=None, progress: bool = True,
              factors: Factorisations | None = None):
    """A slim copy of ``unet`` with every planned module replaced by its decomposition at the planned rank.

    Args:
        plan: the rank plan (:class:`~slimexport.plan.RankPlan` or its JSON form).
        factors: the factorisations the greedy allocation's error curves made (:func:`module_curves`) for this
            UNet, statistics, config and device: taken from there, not made again.

    Returns:
        ``(slim_unet, diagnostics)``; diagnostics hold per-module relative errors, Cholesky fallbacks and the
        number of factorisations reused.
    """
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    factors = factors if factors is not None else Factorisations()
    plan = plan.to_dict() if isinstance(plan, RankPlan) else plan  # read once, not per module
    ranks = plan["ranks"]
    slim = copy.deepcopy(unet)
    diag = {"rel_error": {}, "cholesky_fallbacks": 0}
    work = [(info, kinds) for unit in UNITS.values() if (kinds := unit_kinds(unit.name))
            for info in getattr(stats, unit.stats_field) if any(k.module_id(info) in ranks for k in kinds)]
    if progress:
        from tqdm.auto import tqdm

        work = tqdm(work, desc="decompose", unit="module group", dynamic_ncols=True)
    for info, kinds in work:
        results, errs, fallbacks = decompose_unit(unet, info, kinds, stats, plan, cfg, device, factors)
        for applied in results:
            replace_linears(slim, applied.weights)
            if applied.factored is not None:
                parent, attr, u, v, b = applied.factored
                factor_layer(slim.get_submodule(parent), attr, u, v, b)
        diag["rel_error"].update(errs)
        diag["cholesky_fallbacks"] += fallbacks
    if diag["cholesky_fallbacks"]:
        log.warning("%d correlation(s) were ill-conditioned and needed the Cholesky fallback (eigenvalue shift)",
                    diag["cholesky_fallbacks"])
    diag["factorisations_reused"] = factors.reused
    install_processors(slim)
    return slim.eval().requires_grad_(False), diag
