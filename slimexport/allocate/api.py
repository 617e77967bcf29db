"""Stage E: module scores and costs → a rank plan under the budget.

The plan is a :class:`~slimexport.plan.RankPlan`: ranks per module, per-module diagnostics, and parameter counts of
the targeted modules and of the whole UNet before and after. What each kind costs, its maximum rank and its rank
step come from the kinds table (``slimexport.models.kinds``); with ``metric="latency"`` the costs are engine time
measured per rank level (a :class:`~slimexport.latency.LatencyTable`), and the budget is a fraction of the dense
UNet's engine latency.
"""

from __future__ import annotations

import math
from dataclasses import replace

from slimexport.allocate.budget import (
    LevelCostTable,
    ModuleCost,
    allocate_greedy,
    allocate_ranks,
    max_step_cost,
    softmax_weights,
)
from slimexport.allocate.scores import module_score
from slimexport.calibrate.stats import CalibStats
from slimexport.config import TARGETS, AllocConfig, DecomposeConfig
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


def latency_budget(budget: float, table: LevelCostTable, modules: list[ModuleCost], targets) -> float:
    """A budget in whole-UNet engine latency (``metric=latency``) as a fraction of the targeted modules' latency cost.

    The time no targeted rank controls (``dense_ms − Σ_m C_m(d_m)``) is fixed, so the targeted modules absorb the
    whole cut: ``(B · dense_ms − fixed) / Σ_m C_m(d_m)``.

    Raises:
        UsageError: the budget is below the smallest feasible one (every module at its lowest level), which the
            message names in whole-UNet latency.
    """
    more = [t for t in TARGETS if t not in targets]
    targeted = sum(m.dense_cost for m in modules)
    fixed = table.dense_ms - targeted
    floor_ms = fixed + sum(m.level_costs()[0] for m in modules)
    floor = floor_ms / table.dense_ms
    if budget < floor - 1e-12:
        raise UsageError(
            f"a latency budget of {budget:g} is below the smallest feasible budget {floor:.4f} of the dense engine latency "
            f"({','.join(targets)} at their rank floors: predicted {floor_ms:.1f} ms of {table.dense_ms:.1f} ms, "
            f"{table.dense_ms / floor_ms:.3f}x at most)",
            f"use --budget >= {math.ceil(floor * 1000) / 1000:g} or lower --r-min"
            + (f", or add targets (--targets {','.join((*targets, *more[:1]))})" if more else ""),
        )
    return min((budget * table.dense_ms - fixed) / targeted, 1.0)


def latency_costs(table: LevelCostTable, modules: list[ModuleCost]) -> list[ModuleCost]:
    """The modules with their measured latency cost at every rank level (``ModuleCost.costs``, ms)."""
    return [replace(m, costs=tuple(table.level_costs(m.name, m.rank_levels()))) for m in modules]


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
               latent_hw: tuple[int, int] | None = None, factors=None, latency: LevelCostTable | None = None) -> RankPlan:
    """The rank plan (its JSON form: ``{"ranks": {module: rank}, "modules": {...}, "params": {...}, ...}``).

    ``latent_hw`` (default: the UNet's sample size) sets the token counts of the ``macs`` metric. ``factors``
    (a :class:`~slimexport.decompose.methods.Factorisations`): where the greedy allocation's error curves leave
    their factorisations for the decomposition. ``latency``: a :class:`~slimexport.latency.LatencyTable` measured
    on the engine; needed by ``acfg.metric == "latency"`` (the budget is then a fraction of its ``dense_ms``, the
    whole UNet's engine latency, whatever ``acfg.scope``), and with any metric the plan's ``allocation["latency"]``
    records its prediction (dense ms, predicted slim ms, predicted speed-up) when it covers the planned modules.

    Raises:
        UsageError: the budget is below what the rank floors reach; ``metric="latency"`` without a table, or with
            one lacking a planned module.
    """
    if acfg.metric == "latency" and latency is None:
        raise UsageError("--budget-metric latency needs a latency table measured on the engine",
                         "pass latency=slimexport.latency.measure_table(...) to plan_ranks (slimexport build measures it)")
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
    unet_dense = sum(p.numel() for p in unet.parameters())
    if acfg.metric == "latency":
        if not latency.covers(m.name for m in modules):
            missing = next(m.name for m in modules if not latency.covers([m.name]))
            raise UsageError(f"the latency table has no entry for {missing} (measured for other targets or another UNet)",
                             f"measure the table with --targets {','.join(acfg.targets)} on this UNet")
        modules = latency_costs(latency, modules)
        budget = latency_budget(acfg.budget, latency, modules, acfg.targets)
    else:
        budget = targeted_budget(acfg, sum(m.dense_params for m in modules), unet_dense if tokens is None else unet_macs)
    targeted_cost = sum(m.dense_cost for m in modules)
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
    by_params = acfg.metric == "params"
    allocation = {"method": acfg.method, "metric": acfg.metric, "targeted_budget": budget, "target": budget * targeted_cost,
                  "kept": sum(_kept_cost(m, ranks[m.name]) for m in modules), "max_step": max_step_cost(modules)}
    if latency is not None and latency.covers(ranks):
        allocation["latency"] = latency.prediction(ranks)
    return RankPlan(
        budget=acfg.budget, scope=acfg.scope, metric=acfg.metric, targeted_budget=budget, targets=list(acfg.targets),
        ranks=ranks,
        modules={
            m.name: ModulePlan(kind=m.kind, rank=ranks[m.name], max_rank=m.max_rank, keep=ranks[m.name] / m.max_rank,
                               unit_cost=param_cost[m.name], alloc_cost=_alloc_cost(m), quantum=m.quantum, r_min=m.r_min,
                               score=m.score, softmax=p, timestep_weights=plan_weights(scored[m.name]["ms"].bin_weights),
                               **({"rel_error": float(curves[m.name][ranks[m.name]]), "weight": weights[m.name]} if greedy else {}))
            for m, p in zip(modules, pi)
        },
        params={
            "targeted_dense": targeted_dense, "targeted_slim": targeted_slim,
            "target": budget * targeted_dense if by_params else None, "max_step": max_step_cost(modules) if by_params else None,
            "dense_total": unet_dense, "slim_total": unet_dense - targeted_dense + targeted_slim,
        },
        allocation=allocation,
    )


def _kept_cost(m: ModuleCost, rank: int):
    """The module's cost at a rank the allocation chose (one of its levels)."""
    return m.level_costs()[m.levels().index(rank)]


def _alloc_cost(m: ModuleCost):
    """The cost per unit of rank the budget counted: ``unit_cost``, or with level costs (latency, ms) their mean
    per unit at full rank."""
    return m.unit_cost if m.costs is None else round(m.dense_cost / m.max_rank, 6)
