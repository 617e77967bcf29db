"""Automatic rank allocation under one parameter budget (method §7).

Each module m has a maximum rank ``d_m`` (per-head size for attention, intermediate width for the FFN), a cost
``c_m`` in parameters per unit of rank, a floor ``r_min_m`` and a rounding quantum ``q_m``. With scores
``s_m``, z-scored and passed through ``π = softmax(z / τ)``:

    ρ_m(λ) = clip(λ · M · π_m, r_min_m / d_m, 1),   λ by bisection so that Σ c_m d_m ρ_m = B · P,

then ``r_m`` starts at the highest rank level (``r_min``, multiples of ``q``, ``d``) at or below ``ρ_m d_m``, and
a greedy fix-up moves one level at a time (the module furthest below its continuous rank first) until the kept parameters are at most ``B · P`` and
no further level fits: the result is within one quantum of the target. ``τ → ∞`` gives uniform keep ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimexport.errors import UsageError

BISECTION_STEPS = 200


@dataclass(frozen=True)
class ModuleCost:
    """One compressible module as the allocator sees it.

    Attributes:
        name: module id (``<block path>.attn1.qk`` ...).
        kind: ``attn1.qk`` / ``attn1.vo`` / ``attn2.qk`` / ``attn2.vo`` / ``ff``.
        max_rank: ``d_m``.
        unit_cost: parameters per unit of rank ``c_m``.
        r_min: smallest rank allowed.
        quantum: rank step ``q_m``.
        score: importance ``s_m`` (higher keeps more).
    """

    name: str
    kind: str
    max_rank: int
    unit_cost: int
    r_min: int
    quantum: int
    score: float

    def levels(self) -> list[int]:
        """The ranks this module may take, ascending."""
        lo = min(self.r_min, self.max_rank)
        steps = range(self.quantum, self.max_rank, self.quantum)
        return sorted({lo, self.max_rank, *[r for r in steps if r > lo]})

    @property
    def dense_params(self) -> int:
        return self.max_rank * self.unit_cost


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
    """Continuous keep ratios ``ρ_m`` meeting ``Σ c_m d_m ρ_m = target`` (bisection on λ)."""
    n = len(modules)
    lo_r = [min(m.r_min, m.max_rank) / m.max_rank for m in modules]
    dense = [m.dense_params for m in modules]

    def kept(lam: float) -> float:
        return sum(p * min(max(lam * n * w, lo), 1.0) for p, w, lo in zip(dense, pi, lo_r))

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
    return sum(m.levels()[0] * m.unit_cost for m in modules) / sum(m.dense_params for m in modules)


def feasible_target(modules: list[ModuleCost], budget: float) -> float:
    """``budget`` × the modules' dense cost; a clear error when the rank floors keep more than that."""
    floor = min_budget(modules)
    if budget < floor - 1e-12:
        raise UsageError(
            f"budget {budget:g} is below the smallest feasible budget {floor:.4f} (every module at r_min)",
            f"use --budget >= {math.ceil(floor * 1000) / 1000:g} or lower --r-min",
        )
    return budget * sum(m.dense_params for m in modules)


def allocate_ranks(modules: list[ModuleCost], budget: float, temperature: float) -> dict[str, int]:
    """Ranks per module keeping at most ``budget`` of the modules' parameters, within one quantum of it.

    Raises:
        UsageError: the budget is below what the rank floors allow.
    """
    target = feasible_target(modules, budget)
    pi = softmax_weights([m.score for m in modules], temperature)
    rho = keep_ratios(modules, pi, target)
    levels = [m.levels() for m in modules]
    idx = []
    for m, lv, r in zip(modules, levels, rho):  # start from the highest level at or below the continuous rank
        want = r * m.max_rank
        idx.append(max([i for i, v in enumerate(lv) if v <= want + 1e-9] or [0]))

    def cost() -> int:
        return sum(lv[i] * m.unit_cost for m, lv, i in zip(modules, levels, idx))

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
                 and (levels[j][idx[j] + 1] - levels[j][idx[j]]) * modules[j].unit_cost <= slack + 1e-9]
        if not cands:
            break
        j = min(cands, key=lambda j: (excess(j, idx[j] + 1), -pi[j], modules[j].name))
        idx[j] += 1
    return {m.name: lv[i] for m, lv, i in zip(modules, levels, idx)}


def max_step_cost(modules: list[ModuleCost]) -> int:
    """Largest parameter cost of one rank step: the allocation's guaranteed distance to the target."""
    out = 0
    for m in modules:
        lv = m.levels()
        out = max(out, max((b - a) * m.unit_cost for a, b in zip(lv, lv[1:])) if len(lv) > 1 else 0)
    return out


def allocate_greedy(modules: list[ModuleCost], budget: float, errors: dict[str, torch.Tensor],
                    weights: dict[str, float]) -> dict[str, int]:
    """Ranks minimising ``Σ_m w_m · e_m(r_m)`` under the budget, greedily (``--allocation greedy``; method notes, "error-aware allocation").

    ``errors[name][r]`` is module m's relative whitened error at rank r (0..max_rank) and ``w_m`` its weight.
    Every module starts at full rank; the rank step with the smallest objective increase per unit of cost saved
    is taken until the kept cost is at most ``budget`` of the total, then steps back up are taken, best gain
    per cost first, while they fit. Levels (``r_min``, quanta) are those of :meth:`ModuleCost.levels`.

    Raises:
        UsageError: the budget is below what the rank floors allow.
    """
    target = feasible_target(modules, budget)
    levels = [m.levels() for m in modules]
    idx = [len(lv) - 1 for lv in levels]
    obj = [[weights[m.name] * float(errors[m.name][r]) for r in lv] for m, lv in zip(modules, levels)]
    cost = sum(lv[i] * m.unit_cost for m, lv, i in zip(modules, levels, idx))

    def down_rate(j: int) -> float:  # objective added per unit of cost saved by one step down
        i = idx[j]
        return (obj[j][i - 1] - obj[j][i]) / ((levels[j][i] - levels[j][i - 1]) * modules[j].unit_cost)

    def up_rate(j: int) -> float:  # objective removed per unit of cost spent on one step up
        i = idx[j]
        return (obj[j][i] - obj[j][i + 1]) / ((levels[j][i + 1] - levels[j][i]) * modules[j].unit_cost)

    while cost > target + 1e-9:
        j = min((j for j in range(len(modules)) if idx[j] > 0), key=lambda j: (down_rate(j), modules[j].name))
        cost -= (levels[j][idx[j]] - levels[j][idx[j] - 1]) * modules[j].unit_cost
        idx[j] -= 1
    while True:  # the last step down may have overshot: fill the slack with the most useful steps up
        slack = target - cost
        cands = [j for j in range(len(modules)) if idx[j] + 1 < len(levels[j])
                 and (levels[j][idx[j] + 1] - levels[j][idx[j]]) * modules[j].unit_cost <= slack + 1e-9]
        if not cands:
            break
        j = max(cands, key=lambda j: (up_rate(j), modules[j].name))
        cost += (levels[j][idx[j] + 1] - levels[j][idx[j]]) * modules[j].unit_cost
        idx[j] += 1
    return {m.name: lv[i] for m, lv, i in zip(modules, levels, idx)}
