"""Error-aware greedy allocation: error curves equal the decompositions' errors, the budget holds, and on its
own objective it beats the other allocations."""

import itertools

import pytest
import torch

from slimexport.allocate.budget import ModuleCost, allocate_greedy
from slimexport.config import AllocConfig, DecomposeConfig
from slimexport.decompose import ffn_nystrom as ffn
from slimexport.decompose import resnet_nystrom
from slimexport.decompose.curves import prefix_errors


def _corr(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return x.T @ x + 1e-6 * torch.eye(n, dtype=torch.float64), g


def test_prefix_errors_match_the_nystrom_residual_at_every_width():
    c, g = _corr(24, 0)
    w2 = torch.randn(9, 24, generator=g, dtype=torch.float64)
    order = ffn.pivoted_cholesky_order(c)
    got = prefix_errors(c, order, w2.T)
    want = ffn.nystrom_errors(c, order, w2, list(range(25)))
    assert torch.allclose(got, torch.tensor([want[r] for r in range(25)], dtype=torch.float64), rtol=1e-9, atol=1e-9 * float(got[0]))


def test_prefix_errors_match_the_resnet_group_residual():
    c, g = _corr(24, 1)
    w2 = torch.randn(5, 24, 3, 3, generator=g, dtype=torch.float64)
    groups = resnet_nystrom.group_pivoted_order(c, 4)
    channels = resnet_nystrom.group_channels(groups, 4)
    curve = prefix_errors(c, channels, w2.permute(1, 0, 2, 3).reshape(24, -1))[::4]
    for k in range(1, 6):
        keep = resnet_nystrom.kept_channels(groups, k, 4)
        assert float(curve[k]) == pytest.approx(resnet_nystrom.residual(c, keep, w2), rel=1e-8)


def _mods(n=3, max_rank=8, cost=(3, 5, 7)):
    return [ModuleCost(name=f"m{i}", kind="ff", max_rank=max_rank, unit_cost=cost[i % len(cost)], r_min=1, quantum=1, score=1.0)
            for i in range(n)]


def test_greedy_is_optimal_for_convex_curves_and_respects_the_budget():
    mods = _mods()
    curves = {m.name: torch.tensor([(1 - r / 8) ** (2 + i) for r in range(9)], dtype=torch.float64) for i, m in enumerate(mods)}
    weights = {"m0": 1.0, "m1": 2.0, "m2": 0.5}
    total = sum(m.dense_params for m in mods)
    for budget in (0.3, 0.5, 0.8):
        ranks = allocate_greedy(mods, budget, curves, weights)
        kept = sum(ranks[m.name] * m.unit_cost for m in mods)
        assert kept <= budget * total + 1e-9
        obj = sum(weights[n] * float(curves[n][r]) for n, r in ranks.items())
        best = min(sum(weights[m.name] * float(curves[m.name][r]) for m, r in zip(mods, rs))
                   for rs in itertools.product(range(1, 9), repeat=3) if sum(r * m.unit_cost for m, r in zip(mods, rs)) <= budget * total)
        assert obj <= best * 1.05 + 1e-12  # greedy on convex curves: optimal up to the last indivisible step


def test_greedy_plan_reports_the_errors_the_decomposition_has(tiny, tiny_stats):
    from slimexport.allocate.api import plan_ranks
    from slimexport.decompose.api import slim_unet

    acfg = AllocConfig(budget=0.6, method="greedy", targets=("attn", "ffn", "resnet", "proj"))
    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), acfg)
    a = plan["allocation"]
    assert a["kept"] <= a["target"] + 1e-6
    _, diag = slim_unet(tiny.unet, tiny_stats, plan, DecomposeConfig(), progress=False)
    for name, m in plan["modules"].items():
        assert m["rel_error"] == pytest.approx(diag["rel_error"][name], rel=1e-6, abs=1e-9), name


def test_decomposition_reuses_the_curves_factorisations_exactly(tiny, tiny_stats):
    """Taking the error curves' factorisations gives the very weights factoring again gives, and every one is used."""
    from slimexport.allocate.api import plan_ranks
    from slimexport.decompose.api import Factorisations, slim_unet

    acfg = AllocConfig(budget=0.6, method="greedy", targets=("attn", "ffn", "resnet", "proj"))
    factors = Factorisations()
    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), acfg, factors=factors)
    assert factors._whiteners and not any(w._cache for w in factors._whiteners.values())  # released after the curves
    reused, d_reused = slim_unet(tiny.unet, tiny_stats, plan, DecomposeConfig(), progress=False, factors=factors)
    fresh, d_fresh = slim_unet(tiny.unet, tiny_stats, plan, DecomposeConfig(), progress=False)
    below_break_even = [n for n, m in plan["modules"].items() if not (m["kind"] in ("proj_in", "proj_out") and m["rank"] >= m["max_rank"])]
    assert d_reused["factorisations_reused"] == len(below_break_even) and d_fresh["factorisations_reused"] == 0
    a, b = reused.state_dict(), fresh.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert d_reused["rel_error"] == d_fresh["rel_error"] and d_reused["cholesky_fallbacks"] == d_fresh["cholesky_fallbacks"]
    for name, m in plan["modules"].items():  # the curves and the decomposition factor the same matrices now
        assert m["rel_error"] == pytest.approx(d_reused["rel_error"][name], rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("targets", [("attn", "ffn"), ("attn", "ffn", "resnet", "proj")])
def test_greedy_beats_softmax_and_uniform_on_its_objective(tiny, tiny_stats, targets):
    from slimexport.allocate.api import plan_ranks

    greedy = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=0.6, method="greedy", targets=targets))
    weights = {n: m["weight"] for n, m in greedy["modules"].items()}
    from slimexport.allocate.api import score_modules
    from slimexport.decompose.api import module_curves

    scored = score_modules(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(targets=targets, propagation=True))
    curves = module_curves(tiny.unet, tiny_stats, scored, DecomposeConfig())

    def objective(plan):
        return sum(weights[n] * float(curves[n][r]) for n, r in plan["ranks"].items())

    for method in ("softmax", "uniform"):
        other = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=0.6, method=method, targets=targets))
        assert objective(greedy) <= objective(other)


def test_greedy_allocates_baselines_by_the_whitened_curves(tiny, tiny_stats):
    """A baseline decomposition (plain weight SVD, random selection) gets the ranks the whitened curves choose, so a
    negative control at the default allocation compares selections at the same ranks."""
    from slimexport.allocate.api import curve_config, plan_ranks, reuses_curves

    base = DecomposeConfig(qkvo_method="weight", ffn_selection="random")
    assert not reuses_curves(base) and reuses_curves(DecomposeConfig())
    assert curve_config(base) == base.replace(qkvo_method="whiten", ffn_selection="cpqr")
    acfg = AllocConfig(budget=0.6, method="greedy")
    assert plan_ranks(tiny.unet, tiny_stats, base, acfg)["ranks"] == plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), acfg)["ranks"]
