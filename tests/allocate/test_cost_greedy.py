"""Allocation by any per-level cost: non-linear costs, dominated levels, and the latency budget of ``plan_ranks``."""

import itertools
import math

import pytest
import torch

from slimexport.allocate.budget import ModuleCost, allocate_greedy, allocate_ranks, max_step_cost, min_budget
from slimexport.config import AllocConfig, DecomposeConfig
from slimexport.errors import UsageError


def _mod(name, costs, score=1.0, max_rank=4):
    return ModuleCost(name=name, kind="ff", max_rank=max_rank, unit_cost=1, r_min=1, quantum=1, score=score, costs=costs)


def test_greedy_finds_the_hand_computed_optimum_under_non_linear_costs():
    # A: cheap first ranks, dear last ones; B: the opposite. Kept cost at most 7 of 10 (budget 0.7).
    a = ModuleCost("A", "ff", 3, 1, 1, 1, 1.0, costs=(1.0, 3.0, 6.0))
    b = ModuleCost("B", "ff", 3, 1, 1, 1, 1.0, costs=(2.0, 3.0, 4.0))
    errors = {"A": torch.tensor([1.0, 0.9, 0.3, 0.0], dtype=torch.float64), "B": torch.tensor([1.0, 0.5, 0.2, 0.0], dtype=torch.float64)}
    ranks = allocate_greedy([a, b], 0.7, errors, {"A": 1.0, "B": 1.0})
    # feasible pairs: (2,3) cost 7 error 0.3; (2,2) 6, 0.5; (1,3) 5, 0.9; (3,1) costs 8: too dear
    assert ranks == {"A": 2, "B": 3}
    # by parameters (cost = rank) the same budget keeps 4 of 6 ranks: (2,2), error 0.5, not the latency optimum
    lin = allocate_greedy([ModuleCost("A", "ff", 3, 1, 1, 1, 1.0), ModuleCost("B", "ff", 3, 1, 1, 1, 1.0)], 0.7, errors,
                          {"A": 1.0, "B": 1.0})
    assert lin == {"A": 2, "B": 2}


def test_greedy_is_near_optimal_on_convex_non_linear_costs():
    g = torch.Generator().manual_seed(0)
    mods, errors = [], {}
    for i in range(3):
        steps = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
        costs = tuple(float(c) for c in torch.cumsum(torch.sort(steps).values, 0))  # convex: each step dearer
        mods.append(_mod(f"m{i}", costs, max_rank=5))
        cost_frac = torch.tensor([0.0, *costs], dtype=torch.float64) / costs[-1]
        errors[f"m{i}"] = (1 - cost_frac) ** (2 + i)  # convex in cost: greedy's rate ordering is exact
    weights = {"m0": 1.0, "m1": 2.0, "m2": 0.5}
    total = sum(m.dense_cost for m in mods)
    for budget in (0.35, 0.5, 0.8):
        ranks = allocate_greedy(mods, budget, errors, weights)
        kept = sum(m.costs[ranks[m.name] - 1] for m in mods)
        assert kept <= budget * total + 1e-9
        obj = sum(weights[n] * float(errors[n][r]) for n, r in ranks.items())
        best = min(sum(weights[m.name] * float(errors[m.name][r]) for m, r in zip(mods, rs))
                   for rs in itertools.product(range(1, 6), repeat=3)
                   if sum(m.costs[r - 1] for m, r in zip(mods, rs)) <= budget * total + 1e-9)
        assert obj <= best * 1.05 + 1e-12


def test_a_level_costing_no_less_than_a_higher_one_is_never_chosen():
    m = _mod("m", (2.0, 1.5, 3.0, 4.0))  # rank 1 costs more than rank 2: dominated
    assert m.levels() == [2, 3, 4] and m.level_costs() == [1.5, 3.0, 4.0]
    assert min_budget([m]) == pytest.approx(1.5 / 4.0)
    assert max_step_cost([m]) == pytest.approx(1.5)
    errors = {"m": torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0], dtype=torch.float64)}
    assert allocate_greedy([m], min_budget([m]), errors, {"m": 1.0}) == {"m": 2}
    assert allocate_ranks([m], min_budget([m]), 1.0) == {"m": 2}
    with pytest.raises(UsageError, match="level costs"):
        _mod("bad", (1.0, 2.0))


def test_explicit_linear_costs_allocate_as_the_default_ones():
    specs = [(40, 5120, 8, 8, 0.3), (1280, 962, 64, 8, -0.2), (40, 5120, 8, 8, 1.1), (1280, 962, 64, 8, 0.7)]
    plain = [ModuleCost(f"m{i}", "ff", d, c, r, q, s) for i, (d, c, q, r, s) in enumerate(specs)]
    given = [ModuleCost(m.name, m.kind, m.max_rank, m.unit_cost, m.r_min, m.quantum, m.score,
                        costs=tuple(float(r * m.unit_cost) for r in m.rank_levels())) for m in plain]
    for budget, temperature in ((0.73, 1.0), (0.5, math.inf), (0.3, 0.5)):
        assert allocate_ranks(given, budget, temperature) == allocate_ranks(plain, budget, temperature)


def test_softmax_and_uniform_meet_a_non_linear_budget_within_one_step():
    mods = [_mod(f"m{i}", tuple(float(c) for c in cs), score=s, max_rank=5)
            for i, (cs, s) in enumerate([((1, 2, 4, 8, 16), 0.2), ((3, 4, 5, 6, 7), 1.0), ((2, 5, 6, 7, 12), -0.4)])]
    total = sum(m.dense_cost for m in mods)
    for temperature in (1.0, math.inf):
        for budget in (0.4, 0.6, 0.9):
            ranks = allocate_ranks(mods, budget, temperature)
            kept = sum(m.costs[ranks[m.name] - 1] for m in mods)
            assert budget * total - max_step_cost(mods) - 1e-9 <= kept <= budget * total + 1e-9
    with pytest.raises(UsageError, match="smallest feasible budget"):
        allocate_ranks(mods, 0.1, 1.0)


# --- plan_ranks with metric="latency" on the tiny model ------------------------------------------------------------
def _fake_table(unet, targets, dense_ms=100.0, per_rank_ms=0.01):
    """A table for ``tiny``'s targeted modules: every module costs ``per_rank_ms`` per rank plus 0.1 ms."""
    from slimexport.latency.table import Group, LatencyTable, TableKey
    from slimexport.models.kinds import KINDS, UNITS, targeted_kinds

    groups, members = {}, {}
    for kind in targeted_kinds(targets):
        k = KINDS[kind]
        for info in UNITS[k.unit].find(unet):
            d = k.max_rank(info)
            gid = f"{kind}:{d}"
            groups[gid] = Group(kind=kind, max_rank=d, signature={"d": d}, widths=(1, d), times_ms=(0.1 + per_rank_ms, 0.1 + per_rank_ms * d))
            members[k.module_id(info)] = gid
    key = TableKey(backend="onnxruntime", device="cpu", device_name="x", dtype="fp32", threads=1, batch=2, height=16, width=16,
                   versions={}, arch="tiny")
    return LatencyTable(key=key, dense_ms=dense_ms, groups=groups, members=members)


def test_latency_metric_needs_a_table_that_covers_the_targets(tiny, tiny_stats):
    from slimexport.allocate.api import plan_ranks

    acfg = AllocConfig(budget=0.9, metric="latency")
    with pytest.raises(UsageError, match="needs a latency table"):
        plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), acfg)
    with pytest.raises(UsageError, match="no entry for .*--targets attn,ffn"):
        plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), acfg, latency=_fake_table(tiny.unet, ("ffn",)))


def test_latency_budget_is_a_fraction_of_the_dense_engine_latency(tiny, tiny_stats):
    from slimexport.allocate.api import plan_ranks

    table = _fake_table(tiny.unet, ("attn", "ffn"))
    for method in ("greedy", "softmax", "uniform"):
        plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=0.9, metric="latency", method=method),
                          latency=table)
        lat = plan["allocation"]["latency"]
        assert lat["dense_ms"] == 100.0 and lat["predicted_ms"] == pytest.approx(table.predict_ms(plan["ranks"]), abs=1e-3)
        step = plan["allocation"]["max_step"]
        assert 90.0 - step - 1e-6 <= lat["predicted_ms"] <= 90.0 + 1e-6, method  # within one level step of the target
        assert lat["predicted_speedup"] == pytest.approx(100.0 / lat["predicted_ms"], rel=1e-3)
    # a parameter budget records the table's prediction too
    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=0.6), latency=table)
    assert plan["allocation"]["latency"]["predicted_ms"] < 100.0


def test_an_unreachable_latency_budget_names_the_smallest_reachable_one(tiny, tiny_stats):
    from slimexport.allocate.api import plan_ranks

    table = _fake_table(tiny.unet, ("attn", "ffn"))
    targeted = sum(table.level_costs(m, [table.group_of(m).max_rank])[0] for m in table.members)
    assert targeted < 50  # the fake modules hold under half of the 100 ms: a 0.5 budget cannot be met
    with pytest.raises(UsageError, match=r"smallest feasible budget 0\.\d{4} of the dense engine latency.*--targets attn,ffn,resnet"):
        plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=0.5, metric="latency"), latency=table)
