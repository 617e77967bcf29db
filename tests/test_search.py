"""``--speedup S``: the search's next budget, its termination, the folder it ends on, and the unreachable message."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from slimexport.config import BuildConfig
from slimexport.errors import TargetNotReachedError, UsageError
from slimexport.search import SEARCH_FILE, check_target, next_budget, speedup_search


def test_next_budget_follows_the_measurements_and_stays_inside_the_bracket():
    # one point: through the origin (b · m / S), lowered by half the tolerance until a budget reaches the target
    assert next_budget([(0.8, 1.2)], 1.5, None, None, 0.1, 0.02) == pytest.approx(0.63)
    # two points: the secant of 1/m against b (30 % of the time untouched: 1/m = 0.3 + 0.7 b) meets 1/S exactly
    pts = [(b, 1 / (0.3 + 0.7 * b)) for b in (0.8, 0.7)]
    assert next_budget(pts, 1.3, None, None, 0.1, 0.0) == pytest.approx((1 / 1.3 - 0.3) / 0.7, abs=1e-4)
    assert next_budget(pts, 1.3, 0.66, 0.7, 0.1, 0.02) == pytest.approx(0.6703, abs=1e-4)  # no margin once reached
    assert next_budget([(0.5, 3.0)], 1.5, 0.5, 0.6, 0.1) == pytest.approx(0.55)  # outside the bracket: the midpoint
    assert next_budget([(0.2, 1.0)], 1.5, None, 0.2, 0.15) == pytest.approx(0.175)  # between the floor and the miss


def test_check_target():
    assert check_target(1.3) == 1.3
    for bad in (1.0, 0.5, True, "fast"):
        with pytest.raises(UsageError, match="pass a number above 1"):
            check_target(bad)


def _fake_build(speed_of, floor=None):
    """``api.build`` answering with ``speed_of(budget)`` (and refusing budgets below ``floor`` as the allocation does)."""
    calls = []

    def fake(cfg, out=None, progress=True, cache_dir=None, budget=None, figures=True, **kw):
        calls.append(budget if figures is False else ("final", budget))
        if floor is not None and budget < floor:
            raise UsageError(f"budget {budget:g} is below the smallest feasible budget {floor:.4f} (every module at r_min)",
                             "use --budget >= ...")
        out.mkdir(parents=True, exist_ok=True)
        s = speed_of(budget)
        return SimpleNamespace(out_dir=out, passed=True, report={"passed": True, "speed": {"speedup": s, "speedup_ci95": [s, s]}})

    return calls, fake


def test_search_finds_the_largest_budget_that_reaches_the_target(tmp_path):
    calls, fake = _fake_build(lambda b: 1.0 / (0.3 + 0.7 * b))  # fixed 30 % of the time, the rest scales
    res = speedup_search(BuildConfig(), 1.3, tmp_path / "out", fake, tolerance=0.01, max_trials=8)
    rec = json.loads((tmp_path / "out" / SEARCH_FILE).read_text())
    best = (1 / 1.3 - 0.3) / 0.7  # 0.670: the exact largest budget reaching 1.3
    assert rec["reached"] and best - 0.02 <= rec["chosen_budget"] <= best + 1e-9
    assert calls[0] == pytest.approx(1 / 1.3, abs=1e-4) and len(calls) <= 9
    # trials skip the figures; the folder ends holding the chosen build, figures and all
    assert all(not isinstance(c, tuple) for c in calls[:-1]) and len(calls) - 1 == len(rec["trials"])
    assert calls[-1] == ("final", rec["chosen_budget"]) and rec["final"]["speedup"] >= 1.3
    assert res.report["speed_target"]["chosen_budget"] == rec["chosen_budget"]
    assert all(t["reached"] == (t["speedup"] >= 1.3) for t in rec["trials"])


def test_unreachable_target_stops_at_the_floor_and_says_the_best(tmp_path):
    calls, fake = _fake_build(lambda b: 1.0 / (0.6 + 0.4 * b), floor=0.3)  # at most 1.39x at the floor
    with pytest.raises(TargetNotReachedError, match=r"--speedup 2 not reached .* best measured 1\.389x at budget 0\.3"):
        speedup_search(BuildConfig(), 2.0, tmp_path / "out", fake)
    rec = json.loads((tmp_path / "out" / SEARCH_FILE).read_text())
    assert not rec["reached"] and rec["chosen_budget"] == 0.3
    assert calls[0] == 0.5 and len(calls) <= 6  # (one guess fell below the floor and was refused)
    assert calls[-1] == ("final", 0.3)  # the fastest build is what the folder holds


def test_a_target_below_the_floor_from_the_start_retries_at_the_floor(tmp_path):
    calls, fake = _fake_build(lambda b: 1.0 / b, floor=0.4)
    res = speedup_search(BuildConfig(), 2.2, tmp_path / "out", fake)  # 1/2.2 = 0.4545: feasible
    assert res.report["speed_target"]["reached"]
    calls, fake = _fake_build(lambda b: 1.0 / b, floor=0.6)
    with pytest.raises(TargetNotReachedError, match="best measured 1.667x at budget 0.6"):
        speedup_search(BuildConfig(), 2.2, tmp_path / "out2", fake)
    assert calls == [0.4545, 0.6, ("final", 0.6)]


def test_the_last_trial_is_rebuilt_only_for_its_figures(tmp_path):
    """When the search ends on the chosen budget, the folder already holds it: rebuilt (every stage reused) only to
    draw the figures the trials skipped."""
    for figures, expected in ((True, [0.8, ("final", 0.8)]), (False, [0.8])):
        calls, fake = _fake_build(lambda b: 1.0 / b)
        res = speedup_search(BuildConfig(figures=figures), 1.25, tmp_path / f"out-{figures}", fake, max_trials=1)
        assert calls == expected and res.report["speed_target"]["chosen_budget"] == 0.8


def test_other_usage_errors_are_not_taken_for_the_floor(tmp_path):
    def fake(*a, **k):
        raise UsageError("--targets includes resnet but the model has no ResNet modules to slim", "drop 'resnet'")

    with pytest.raises(UsageError, match="no ResNet modules"):
        speedup_search(BuildConfig(), 1.5, tmp_path / "out", fake)


def test_build_hands_the_search_itself(monkeypatch, tmp_path):
    """``api.build(speedup=S)`` runs the search with ``api.build`` as its trial builder."""
    from slimexport import api, search

    seen = {}
    monkeypatch.setattr(search, "speedup_search", lambda cfg, s, out, build, **kw: seen.update(s=s, out=out, build=build))
    api.build(model="tiny", speedup=1.4, out=tmp_path / "o")
    assert seen == {"s": 1.4, "out": tmp_path / "o", "build": api.build}
