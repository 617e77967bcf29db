"""Stage E: module scores and costs → a rank plan under the budget.

The plan is a :class:`~slimexport.plan.RankPlan`: ranks per module, per-module diagnostics, and parameter counts of
the targeted modules and of the whole UNet before and after. What each kind costs, its maximum rank and its rank
step come from the kinds table (``slimexport.models.kinds``).
"""

from __future__ import annotations

import math

from slimexport.allocate.budget import (
    ModuleCost,
    allocate_greedy,
    allocate_ranks,
    max_step_cost,
    softmax_weights,
)
from slimexport.allocate.scores import module_score
from slimexport.calibrate.stats import CalibStats
from slimexport.config import AllocConfig, DecomposeConfig
from slimexport.errors import UsageError
from slimexport.models.kinds import KINDS, UNITS, Info, targeted_kinds
from slimexport.plan import ModulePlan, RankPlan, plan_weights


def unit_cost(info: Info, kind: str) -> int:
    """Parameters per unit of rank (``slimexport.models.kinds``)."""
    return KINDS[kind].unit_params(info)


def unit_macs(info: Info, kind: str, tokens: int, seq_len: int = 77) -> int:
    """MACs per unit of rank in one forward at batch 1."""
    return KINDS[kind].unit_macs(info, tokens, seq_len)


def max_rank(info: Info, kind: str) -> int:
    return KINDS[kind].max_rank(info)


def input_weight(unet, info: Info, kind: str):
    """``A_m`` of the spectral influence score, as the torch weight ``Aᵀ``."""
    k = KINDS[kind]
    return k.layer(unet.get_submodule(info.path), k.input_layer).weight


def rank_step(info: Info, kind: str, cfg: AllocConfig) -> tuple[int, int]:
    """``(quantum, r_min)`` of one module: the kind's rank step (with its ``AllocConfig`` override) and floor."""
    k = KINDS[kind]
    d = k.max_rank(info)
    q = k.quantum(info, getattr(cfg, k.quantum_option) if k.quantum_option else None)
    return q, min(q if k.floor_is_quantum else cfg.r_min, d)


def targeted_budget(acfg: AllocConfig, targeted_dense: int, unet_dense: int) -> float:
    """The budget as a fraction of the targeted cost (``scope=unet`` puts the whole cut on the targets).

    Costs are parameters or, with ``metric=macs``, MACs of one forward at the calibration size."""
    if acfg.scope == "targeted":
        return acfg.budget
    fixed = unet_dense - targeted_dense
    b = (acfg.budget * unet_dense - fixed) / targeted_dense
    if b <= 0:
        raise UsageError(
            f"a whole-UNet budget of {acfg.budget:g} needs more than all targeted {acfg.metric} ({', '.join(acfg.targets)}: "
            f"{targeted_dense / unet_dense:.1%} of the UNet)",
            f"use --budget above {fixed / unet_dense:.3f} or add targets (e.g. --targets attn,ffn,resnet)",
        )
    return b


def _missing_stats(unet, target: str, unit) -> UsageError:
    """The error for a target whose unit the statistics lack: the model has none that can be slimmed, or the
    statistics predate it."""
    try:
        has = bool(unit.find(unet))
    except UsageError as err:
        return UsageError(f"--targets includes {target} but this model's {unit.name} modules cannot be slimmed ({err.message})",
                          f"drop '{target}' from --targets")
    if not has:
        return UsageError(f"--targets includes {target} but the model has no {unit.name} modules to slim",
                          f"drop '{target}' from --targets")
    return UsageError(f"--targets includes {target} but the calibration statistics hold no {unit.name} modules",
                      "recalibrate with this slimexport version (delete the calib/ folder)")


def reuses_curves(dcfg: DecomposeConfig) -> bool:
    """Whether the decomposition is the one the greedy allocation's error curves describe (its factorisations are
    then reused): whitened SVD for attention, CPQR or leverage selection for the FFN."""
    return dcfg.qkvo_method == "whiten" and dcfg.ffn_selection in ("cpqr", "leverage")


def curve_config(dcfg: DecomposeConfig) -> DecomposeConfig:
    """The decomposition settings the greedy allocation's error curves are computed with."""
    return dcfg if reuses_curves(dcfg) else dcfg.replace(qkvo_method="whiten", ffn_selection="cpqr")


def score_modules(unet, stats: CalibStats, dcfg: DecomposeConfig, acfg: AllocConfig) -> dict[str, dict]:
    """Per targeted module: kind, unit info, score, timestep weights (method §5), units in table order."""
    kinds = targeted_kinds(acfg.targets)
    out = {}
    for unit in UNITS.values():
        mine = [KINDS[k] for k in kinds if KINDS[k].unit == unit.name]
        infos = getattr(stats, unit.stats_field)
        if mine and not infos:
            raise _missing_stats(unet, mine[0].target, unit)
        for info in infos:
            for kind in mine:
                w = input_weight(unet, info, kind.name).detach().double()
                ms = module_score(stats, info, kind.name, float((w**2).sum()), dcfg.timestep_weighting, acfg.propagation)
                out[kind.module_id(info)] = {"block": info, "kind": kind.name, "ms": ms}
    return out


def plan_ranks(unet, stats: CalibStats, dcfg: DecomposeConfig, acfg: AllocConfig,
               latent_hw: tuple[int, int] | None = None, factors=None) -> RankPlan:
    """The rank plan (its JSON form: ``{"ranks": {module: rank}, "modules": {...}, "params": {...}, ...}``).

    ``latent_hw`` (default: the UNet's sample size) sets the token counts of the ``macs`` metric. ``factors``
    (a :class:`~slimexport.decompose.methods.Factorisations`): where the greedy allocation's error curves leave
    their factorisations for the decomposition.
    """
    greedy = acfg.method == "greedy"
    scored = score_modules(unet, stats, dcfg, acfg.replace(propagation=True) if greedy else acfg)
    tokens = None
    if acfg.metric == "macs":
        from slimexport.models.macs import count_macs, token_counts

        hw = latent_hw or (None, None)
        tokens = token_counts(unet, *hw)
        unet_macs = count_macs(unet, 1, *hw)["total"]
    modules, param_cost = [], {}
    for name, s in scored.items():
        block, kind = s["block"], s["kind"]
        d = max_rank(block, kind)
        q, r_min = rank_step(block, kind, acfg)
        param_cost[name] = unit_cost(block, kind)
        cost = param_cost[name] if tokens is None else unit_macs(block, kind, tokens[block.path])
        modules.append(ModuleCost(name=name, kind=kind, max_rank=d, unit_cost=cost, r_min=r_min, quantum=q, score=s["ms"].score))
    temperature = math.inf if acfg.method == "uniform" else acfg.temperature
    targeted_cost = sum(m.dense_params for m in modules)
    unet_dense = sum(p.numel() for p in unet.parameters())
    budget = targeted_budget(acfg, targeted_cost, unet_dense if tokens is None else unet_macs)
    curves, weights = {}, {}
    if greedy:
        from slimexport.decompose.api import module_curves

        # the whitened decompositions' error curves: of the decomposition itself, or (random selection, plain SVD:
        # baselines) of the closed forms at the same ranks, whose factorisations the decomposition then cannot reuse
        curves = module_curves(unet, stats, scored, curve_config(dcfg), factors=factors if reuses_curves(dcfg) else None)
        weights = {n: s["ms"].propagation ** 2 for n, s in scored.items()}  # output energy / residual-stream energy
        ranks = allocate_greedy(modules, budget, curves, weights)
        temperature = math.inf  # pi below: uniform, unused
    else:
        ranks = allocate_ranks(modules, budget, temperature)
    pi = softmax_weights([m.score for m in modules], temperature)
    targeted_dense = sum(m.max_rank * param_cost[m.name] for m in modules)
    targeted_slim = sum(ranks[m.name] * param_cost[m.name] for m in modules)
    return RankPlan(
        budget=acfg.budget, scope=acfg.scope, metric=acfg.metric, targeted_budget=budget, targets=list(acfg.targets),
        ranks=ranks,
        modules={
            m.name: ModulePlan(kind=m.kind, rank=ranks[m.name], max_rank=m.max_rank, keep=ranks[m.name] / m.max_rank,
                               unit_cost=param_cost[m.name], alloc_cost=m.unit_cost, quantum=m.quantum, r_min=m.r_min,
                               score=m.score, softmax=p, timestep_weights=plan_weights(scored[m.name]["ms"].bin_weights),
                               **({"rel_error": float(curves[m.name][ranks[m.name]]), "weight": weights[m.name]} if greedy else {}))
            for m, p in zip(modules, pi)
        },
        params={
            "targeted_dense": targeted_dense, "targeted_slim": targeted_slim,
            "target": budget * targeted_dense if tokens is None else None, "max_step": max_step_cost(modules) if tokens is None else None,
            "dense_total": unet_dense, "slim_total": unet_dense - targeted_dense + targeted_slim,
        },
        allocation={"method": acfg.method, "metric": acfg.metric, "targeted_budget": budget, "target": budget * targeted_cost,
                    "kept": sum(ranks[m.name] * m.unit_cost for m in modules), "max_step": max_step_cost(modules)},
    )
