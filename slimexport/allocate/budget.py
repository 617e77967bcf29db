"""Automatic rank allocation under one budget (method §7), in parameters, MACs or measured latency.

Each module m has a maximum rank ``d_m`` (per-head size for attention, intermediate width for the FFN), a floor
``r_min_m``, a rounding quantum ``q_m`` and a cost ``C_m(r)`` at each rank level: ``c_m · r`` (``c_m`` parameters
or MACs per unit of rank) by default, or any per-level costs (``ModuleCost.costs``: e.g. measured engine time,
``slimexport.latency``), read between levels as linear. With scores ``s_m``, z-scored and passed through
``π = softmax(z / τ)``:

    ρ_m(λ) = clip(λ · M · π_m, r_min_m / d_m, 1),   λ by bisection so that Σ C_m(ρ_m d_m) = B · Σ C_m(d_m),

then ``r_m`` starts at the highest rank level (``r_min``, multiples of ``q``, ``d``) at or below ``ρ_m d_m``, and
a greedy fix-up moves one level at a time (the module furthest below its continuous rank first) until the kept
cost is at most the target and no further level fits: the result is within one level step of the target.
``τ → ∞`` gives uniform keep ratios. A level that costs no less than a higher one (possible with measured costs:
an unaligned width, or noise) is never chosen: it would lose rank for nothing.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Protocol

import torch

from slimexport.errors import UsageError

BISECTION_STEPS = 200


@dataclass(frozen=True)
class ModuleCost:
    """One compressible module as the allocator sees it.

    Attributes:
        name: module id (``<block path>.attn1.qk`` ...).
        kind: ``attn1.qk`` / ``attn1.vo`` / ``attn2.qk`` / ``attn2.vo`` / ``ff`` ... (``slimexport.models.kinds``).
        max_rank: ``d_m``.
        unit_cost: cost per unit of rank ``c_m`` (parameters or MACs); the level costs when ``costs`` is ``None``.
        r_min: smallest rank allowed.
        quantum: rank step ``q_m``.
        score: importance ``s_m`` (higher keeps more).
        costs: the cost at each of :meth:`rank_levels`, any unit (e.g. ms of engine time); ``None``: ``r · unit_cost``.
    """

    name: str
    kind: str
    max_rank: int
    unit_cost: int
    r_min: int
    quantum: int
    score: float
    costs: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.costs is not None:
            object.__setattr__(self, "costs", tuple(float(c) for c in self.costs))
            n = len(self.rank_levels())
            if len(self.costs) != n:
                raise UsageError(f"{self.name} has {len(self.costs)} level costs for {n} rank levels",
                                 "give one cost per rank level (ModuleCost.rank_levels())")

    def rank_levels(self) -> list[int]:
        """Every rank the floor and the quantum allow, ascending: ``r_min``, the multiples of ``q``, ``d``."""
        lo = min(self.r_min, self.max_rank)
        steps = range(self.quantum, self.max_rank, self.quantum)
        return sorted({lo, self.max_rank, *[r for r in steps if r > lo]})

    def levels(self) -> list[int]:
        """The ranks this module may take, ascending: :meth:`rank_levels`, less those costing no less than a higher one."""
        lv = self.rank_levels()
        if self.costs is None:
            return lv
        keep, cheapest = [], math.inf
        for r, c in zip(reversed(lv), reversed(self.costs)):
            if c < cheapest:
                keep.append(r)
                cheapest = c
        return keep[::-1]

    def level_costs(self) -> list:
        """The cost at each of :meth:`levels` (``r · unit_cost``, exact integers, without ``costs``)."""
        if self.costs is None:
            return [r * self.unit_cost for r in self.rank_levels()]
        by_rank = dict(zip(self.rank_levels(), self.costs))
        return [by_rank[r] for r in self.levels()]

    def kept_cost(self, keep: float):
        """The cost at a continuous keep ratio ``ρ`` (rank ``ρ·d``; linear between levels): :func:`keep_ratios`."""
        if self.costs is None:
            return self.dense_params * keep
        lv, lc = self.levels(), self.level_costs()
        rank = keep * self.max_rank
        if rank <= lv[0]:
            return lc[0]
        i = min(bisect.bisect_left(lv, rank), len(lv) - 1)
        a, b = lv[i - 1], lv[i]
        return lc[i - 1] + (lc[i] - lc[i - 1]) * (rank - a) / (b - a)

    @property
    def dense_params(self) -> int:
        return self.max_rank * self.unit_cost

    @property
    def dense_cost(self):
        """The cost at full rank (``dense_params`` without ``costs``)."""
        return self.dense_params if self.costs is None else self.costs[-1]


class LevelCostTable(Protocol):
    """What the allocation reads of a measured cost table (``slimexport.latency.LatencyTable``)."""

    dense_ms: float

    def covers(self, module_ids) -> bool: ...

    def level_costs(self, module_id: str, levels) -> list[float]: ...

    def predict_ms(self, ranks) -> float: ...

    def prediction(self, ranks) -> dict: ...


def softmax_weights(scores: list[float], temperature: float) -> list[float]:
    """``softmax(z / τ)`` of z-scored scores; uniform for ``τ = inf`` or equal scores."""
    n = len(scores)
    if math.isinf(temperature) or n == 1:
        return [1.0 / n] * n
    s = torch.tensor(scores, dtype=torch.float64)
    std = s.std(unbiased=False)
    z = (s - s.mean()) / std if float(std) > 0 else torch.zeros_like(s)
    return torch.softmax(z / temperature, 0).tolist()


def keep_ratios(modules: list[ModuleCost], pi: list[float], target: float) -> list[float]:
    """Continuous keep ratios ``ρ_m`` meeting ``Σ C_m(ρ_m d_m) = target`` (bisection on λ)."""
    n = len(modules)
    lo_r = [m.levels()[0] / m.max_rank for m in modules]

    def kept(lam: float) -> float:
        return sum(m.kept_cost(min(max(lam * n * w, lo), 1.0)) for m, w, lo in zip(modules, pi, lo_r))

    lo, hi = 0.0, 1.0
    while kept(hi) < target and hi < 1e12:
        hi *= 2
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if kept(mid) < target:
            lo = mid
        else:
            hi = mid
    return [min(max(hi * n * w, l0), 1.0) for w, l0 in zip(pi, lo_r)]


def min_budget(modules: list[ModuleCost]) -> float:
    """Smallest feasible budget: every module at its lowest level."""
    return sum(m.level_costs()[0] for m in modules) / sum(m.dense_cost for m in modules)


def feasible_target(modules: list[ModuleCost], budget: float) -> float:
    """``budget`` × the modules' dense cost; a clear error when the rank floors keep more than that."""
    floor = min_budget(modules)
    if budget < floor - 1e-12:
        raise UsageError(
            f"budget {budget:g} is below the smallest feasible budget {floor:.4f} (every module at r_min)",
            f"use --budget >= {math.ceil(floor * 1000) / 1000:g} or lower --r-min",
        )
    return budget * sum(m.dense_cost for m in modules)


def allocate_ranks(modules: list[ModuleCost], budget: float, temperature: float) -> dict[str, int]:
    """Ranks per module keeping at most ``budget`` of the modules' cost, within one level step of it.

    Raises:
        UsageError: the budget is below what the rank floors allow.
    """
    target = feasible_target(modules, budget)
    pi = softmax_weights([m.score for m in modules], temperature)
    rho = keep_ratios(modules, pi, target)
    levels = [m.levels() for m in modules]
    costs = [m.level_costs() for m in modules]
    idx = []
    for m, lv, r in zip(modules, levels, rho):  # start from the highest level at or below the continuous rank
        want = r * m.max_rank
        idx.append(max([i for i, v in enumerate(lv) if v <= want + 1e-9] or [0]))

    def cost():
        return sum(lc[i] for lc, i in zip(costs, idx))

    want = [r * m.max_rank for m, r in zip(modules, rho)]

    def excess(j: int, i: int) -> float:  # rank above the continuous solution, relative to the module's size
        return (levels[j][i] - want[j]) / modules[j].max_rank

    # Down (a guard: flooring keeps the cost within the budget already): step back the module furthest above.
    while cost() > target + 1e-9:
        cands = [j for j in range(len(modules)) if idx[j] > 0]
        j = max(cands, key=lambda j: (excess(j, idx[j] - 1), -pi[j], modules[j].name))
        idx[j] -= 1
    # Up: step forward the module furthest below its continuous rank while a step still fits.
    while True:
        slack = target - cost()
        cands = [j for j in range(len(modules)) if idx[j] + 1 < len(levels[j])
                 and costs[j][idx[j] + 1] - costs[j][idx[j]] <= slack + 1e-9]
        if not cands:
            break
        j = min(cands, key=lambda j: (excess(j, idx[j] + 1), -pi[j], modules[j].name))
        idx[j] += 1
    return {m.name: lv[i] for m, lv, i in zip(modules, levels, idx)}


def max_step_cost(modules: list[ModuleCost]):
    """Largest cost of one rank step (in the modules' cost unit): the allocation's guaranteed distance to the target."""
    out = 0
    for m in modules:
        lc = m.level_costs()
        out = max(out, max(b - a for a, b in zip(lc, lc[1:])) if len(lc) > 1 else 0)
    return out


def allocate_greedy(modules: list[ModuleCost], budget: float, errors: dict[str, torch.Tensor],
                    weights: dict[str, float]) -> dict[str, int]:
    """Ranks minimising ``Σ_m w_m · e_m(r_m)`` under the budget, greedily (``--allocation greedy``; method notes, "error-aware allocation").

    ``errors[name][r]`` is module m's relative whitened error at rank r (0..max_rank) and ``w_m`` its weight.
    Every module starts at full rank; the rank step with the smallest objective increase per unit of cost saved
    is taken until the kept cost is at most ``budget`` of the total, then steps back up are taken, best gain
    per cost first, while they fit. Levels (``r_min``, quanta) and their costs (parameters, MACs, measured time;
    any increasing costs) are those of :meth:`ModuleCost.levels` and :meth:`ModuleCost.level_costs`.

    Raises:
        UsageError: the budget is below what the rank floors allow.
    """
    target = feasible_target(modules, budget)
    levels = [m.levels() for m in modules]
    costs = [m.level_costs() for m in modules]  # strictly increasing along each module's levels
    idx = [len(lv) - 1 for lv in levels]
    obj = [[weights[m.name] * float(errors[m.name][r]) for r in lv] for m, lv in zip(modules, levels)]
    cost = sum(lc[i] for lc, i in zip(costs, idx))

    def down_rate(j: int) -> float:  # objective added per unit of cost saved by one step down
        i = idx[j]
        return (obj[j][i - 1] - obj[j][i]) / (costs[j][i] - costs[j][i - 1])

    def up_rate(j: int) -> float:  # objective removed per unit of cost spent on one step up
        i = idx[j]
        return (obj[j][i] - obj[j][i + 1]) / (costs[j][i + 1] - costs[j][i])

    while cost > target + 1e-9:
        j = min((j for j in range(len(modules)) if idx[j] > 0), key=lambda j: (down_rate(j), modules[j].name))
        cost -= costs[j][idx[j]] - costs[j][idx[j] - 1]
        idx[j] -= 1
    while True:  # the last step down may have overshot: fill the slack with the most useful steps up
        slack = target - cost
        cands = [j for j in range(len(modules)) if idx[j] + 1 < len(levels[j])
                 and costs[j][idx[j] + 1] - costs[j][idx[j]] <= slack + 1e-9]
        if not cands:
            break
        j = max(cands, key=lambda j: (up_rate(j), modules[j].name))
        cost += costs[j][idx[j] + 1] - costs[j][idx[j]]
        idx[j] += 1
    return {m.name: lv[i] for m, lv, i in zip(modules, levels, idx)}
