import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimexport.allocate.budget import ModuleCost, allocate_ranks, max_step_cost, min_budget, softmax_weights
from slimexport.errors import UsageError


def _sd_like(scores):
    mods = []
    for i, s in enumerate(scores):
        if i % 5 == 4:
            mods.append(ModuleCost(f"m{i}.ff", "ff", 1280, 962, 8, 64, s))
        else:
            mods.append(ModuleCost(f"m{i}.attn", "attn1.qk", 40, 5120, 8, 8, s))
    return mods


def _kept(mods, ranks):
    return sum(ranks[m.name] * m.unit_cost for m in mods)


@pytest.mark.parametrize("budget", [1.0, 0.9, 0.73, 0.6, 0.5, 0.3])
def test_budget_met_within_one_quantum(budget):
    mods = _sd_like([math.sin(i) for i in range(80)])
    ranks = allocate_ranks(mods, budget, 1.0)
    total = sum(m.dense_params for m in mods)
    gap = budget * total - _kept(mods, ranks)
    assert 0 <= gap <= max_step_cost(mods)
    for m in mods:
        assert m.r_min <= ranks[m.name] <= m.max_rank
        assert ranks[m.name] in m.levels()


def test_infinite_temperature_gives_uniform_keep_ratio():
    mods = _sd_like([float(i) for i in range(80)])
    ranks = allocate_ranks(mods, 0.73, math.inf)
    for m in mods:  # every module at the floor or ceiling level of 0.73·d, up to one fix-up step
        assert abs(ranks[m.name] - 0.73 * m.max_rank) <= 2 * m.quantum
    by_kind = {}
    for m in mods:
        by_kind.setdefault(m.kind, set()).add(ranks[m.name])
    assert all(len(v) <= 3 for v in by_kind.values())


def test_higher_score_keeps_more():
    mods = [ModuleCost("low", "attn1.qk", 40, 5120, 8, 8, 0.0), ModuleCost("high", "attn1.qk", 40, 5120, 8, 8, 5.0)]
    ranks = allocate_ranks(mods, 0.6, 1.0)
    assert ranks["high"] > ranks["low"]


def test_budget_below_floor_is_refused_with_the_minimum():
    mods = _sd_like([0.0] * 10)
    with pytest.raises(UsageError, match="smallest feasible budget"):
        allocate_ranks(mods, min_budget(mods) / 2, 1.0)


def test_softmax_weights_uniform_cases():
    assert softmax_weights([1.0, 2.0, 3.0], math.inf) == pytest.approx([1 / 3] * 3)
    assert softmax_weights([2.0, 2.0], 1.0) == pytest.approx([0.5, 0.5])
    assert softmax_weights([4.0], 0.5) == [1.0]


@pytest.mark.parametrize("temperature", [0.25, 1.0, 4.0])
def test_softmax_weights_values(temperature):
    """softmax(z / τ) of the z-scored scores (population std), by hand."""
    scores = [1.0, 2.0, 3.0, 7.0, -0.5]
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    e = [math.exp((s - mean) / std / temperature) for s in scores]
    expect = [x / sum(e) for x in e]
    got = softmax_weights(scores, temperature)
    assert got == pytest.approx(expect, rel=1e-12, abs=1e-15)
    assert sum(got) == pytest.approx(1.0)
    assert got[3] == max(got) and got[4] == min(got) and got[3] > 1 / len(scores)
    # z-scoring: shifting and scaling the scores changes nothing
    assert softmax_weights([10 * s - 3 for s in scores], temperature) == pytest.approx(expect, rel=1e-12, abs=1e-15)


module_st = st.builds(
    lambda d, c, q, rmin, s: (d, c, q, rmin, s),
    st.integers(4, 200), st.integers(1, 5000), st.integers(1, 16), st.integers(1, 12), st.floats(-5, 5),
)


@settings(max_examples=150, deadline=None, derandomize=True)  # the same examples every run: CI cannot flake
@given(st.lists(module_st, min_size=1, max_size=25), st.floats(0.05, 1.0), st.sampled_from([0.25, 1.0, 4.0, math.inf]))
def test_property_budget_and_bounds(specs, budget, temperature):
    mods = [ModuleCost(f"m{i}", "ff", d, c, min(rmin, d), q, s) for i, (d, c, q, rmin, s) in enumerate(specs)]
    if budget < min_budget(mods):
        with pytest.raises(UsageError):
            allocate_ranks(mods, budget, temperature)
        return
    ranks = allocate_ranks(mods, budget, temperature)
    total = sum(m.dense_params for m in mods)
    gap = budget * total - _kept(mods, ranks)
    assert -1e-6 <= gap <= max_step_cost(mods) + 1e-6
    for m in mods:
        assert min(m.r_min, m.max_rank) <= ranks[m.name] <= m.max_rank
