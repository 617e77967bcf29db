"""Cache settings, plans, schedules, schedule.json and the per-call cursor."""

from __future__ import annotations

import pytest

from slimexport.config import parse_cache_mode as parse_mode
from slimexport.errors import ArtifactError, ConfigError, UsageError
from slimexport.stepcache.measure import ChangeProfile
from slimexport.stepcache.schedule import (
    CacheConfig,
    CachePlan,
    Schedule,
    ScheduleCursor,
    read_schedule,
    write_schedules,
)


def _profile(rate_per_step=0.1, steps=10, depths=(1, 2)):
    """A synthetic profile: DDIM-like timesteps 901..1, the same change at every step (depth d: d × rate)."""
    ts = tuple(901 - 100 * i for i in range(steps))
    rows = tuple((None,) + (rate_per_step * d,) * (steps - 1) for d in depths)
    return ChangeProfile(ts, depths, rows, tuple((None,) * steps for _ in depths))


@pytest.mark.parametrize("mode", [0, -2, "sometimes", 2.5, True, None])
def test_bad_mode_is_a_one_line_error(mode):
    with pytest.raises(ConfigError) as err:
        CacheConfig(mode=mode)
    msg = str(err.value)
    assert "\n" not in msg and "CacheConfig.mode" in msg and "N >= 1" in msg


@pytest.mark.parametrize("field,value", [("depth", 0), ("threshold", 0), ("max_interval", 0), ("steps", (25, 0)),
                                         ("steps", ()), ("measure_prompts", 0), ("eps_error", "yes")])
def test_bad_fields(field, value):
    with pytest.raises(ConfigError, match=f"CacheConfig.{field}"):
        CacheConfig(mode="auto", **{field: value})


def test_config_round_trip_and_cli_words():
    cfg = CacheConfig(mode=3, depth=2, steps=(25, 50))
    assert CacheConfig.from_dict(cfg.to_dict()) == cfg
    assert CacheConfig.from_dict(CacheConfig(mode="auto").to_dict()).mode == "auto"
    assert [parse_mode(s) for s in ("auto", "OFF", " 4 ", 2)] == ["auto", "off", 4, 2]
    with pytest.raises(UsageError, match="--cache"):
        parse_mode("fast")
    with pytest.raises(ConfigError, match="mode"):
        CacheConfig(mode=parse_mode("0"))
    with pytest.raises(UsageError, match="no field"):
        CacheConfig.from_dict({"mode": 2, "intervall": 3})
    assert CacheConfig().describe() == "off" and "interval 3, depth 2" in cfg.describe()


def test_schedule_validation():
    with pytest.raises(UsageError, match="step 0"):
        Schedule(1, (False, True))
    with pytest.raises(UsageError, match=">= 1"):
        Schedule(1, ())
    with pytest.raises(UsageError, match=">= 1"):
        CachePlan(CacheConfig(mode=2)).schedule_for_steps(0, None)
    with pytest.raises(UsageError, match="timesteps"):
        Schedule(1, (True, False), (900.0,))
    s = Schedule.uniform(7, 3, 1)
    assert s.pattern() == "FssFssF" and s.num_full == 3
    assert s.relative_cost(0.25) == pytest.approx((3 + 4 * 0.25) / 7)
    assert Schedule.from_dict(s.to_dict()) == s


def test_interval_plan_is_uniform_whatever_the_timesteps(tiny):
    plan = CachePlan(CacheConfig(mode=3))
    assert plan.schedule_for_steps(10, tiny.make_scheduler).pattern() == "FssFssFssF"
    assert CachePlan(CacheConfig(mode=1)).schedule([900, 500, 100]).pattern() == "FFF"


def test_off_and_auto_without_profile_refused():
    with pytest.raises(UsageError, match="off"):
        CachePlan(CacheConfig())
    with pytest.raises(UsageError, match="change profile"):
        CachePlan(CacheConfig(mode="auto"))
    with pytest.raises(UsageError, match="depth 3 was not measured"):
        CachePlan(CacheConfig(mode="auto", depth=3), _profile())


def test_auto_plan_maps_the_measured_change_by_timestep():
    """0.1 change per 100 timesteps; threshold 0.25: a shallow step may reuse at most 250 timesteps of drift."""
    plan = CachePlan(CacheConfig(mode="auto", threshold=0.25, max_interval=50), _profile(0.1))
    assert plan.schedule([901 - 100 * i for i in range(10)]).pattern() == "FssFssFssF"  # 200 ok, 300 not
    fine = plan.schedule([981 - 20 * i for i in range(50)])  # 50 steps of 20: 12 reuse steps between full ones
    assert fine.pattern().startswith("F" + "s" * 12 + "F")
    # deeper caches change faster here (0.2 per 100): more full steps
    deep = CachePlan(CacheConfig(mode="auto", depth=2, threshold=0.25, max_interval=50), _profile(0.1))
    assert deep.schedule([981 - 20 * i for i in range(50)]).num_full > fine.num_full
    # max_interval caps the run of shallow steps
    capped = CachePlan(CacheConfig(mode="auto", threshold=100.0, max_interval=4), _profile(0.1))
    assert capped.schedule(range(999, 989, -1)).pattern() == "FsssFsssFs"


def test_schedule_json_round_trip(tmp_path, tiny):
    plans = {"dense": CachePlan(CacheConfig(mode="auto", steps=(10, 25)), _profile()), "slim": CachePlan(CacheConfig(mode=2))}
    write_schedules(tmp_path / "schedule.json", plans, tiny.make_scheduler)
    back = read_schedule(tmp_path)
    assert back == plans
    assert read_schedule(tmp_path / "schedule.json", "slim") == plans["slim"]
    import json

    d = json.loads((tmp_path / "schedule.json").read_text())
    assert d["format"] == "slimexport.stepcache.schedule/1"
    assert set(d["unets"]["dense"]["schedules"]) == {"10", "25"}
    assert d["unets"]["slim"]["schedules"]["10"]["pattern"] == "FsFsFsFsFs"
    with pytest.raises(UsageError, match="no step-cache plan for 'other'"):
        read_schedule(tmp_path, "other")
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(ArtifactError):
        read_schedule(tmp_path / "bad.json")


def test_cursor_detects_new_generations():
    cur = ScheduleCursor(CachePlan(CacheConfig(mode=2)))
    run = [cur.next(t, "a") for t in (900, 700, 500, 300, 100)]
    assert run == [True, False, True, False, True] and cur.history == "FsFsF"
    assert cur.next(900, "a") and cur.history == "F"  # timestep went up: a new generation
    assert not cur.next(800, "a")
    assert cur.next(700, "b")  # the input's shape changed: the cache does not fit, start again
    cur.next(600, "b")
    cur.reset()
    assert cur.next(500, "b") and cur.history == "F"
    assert cur.next(500, "b") and cur.history == "F"  # a repeated timestep restarts (Heun-type samplers: all full)
    assert cur.calls_full == 7 and cur.calls_shallow == 4


def test_cursor_on_a_fixed_schedule():
    cur = ScheduleCursor(Schedule(1, (True, False, False)))
    assert [cur.next(t) for t in (3, 2, 1)] == [True, False, False]
    assert cur.next(3)  # new generation
    cur.next(2)
    cur.next(1)
    with pytest.raises(UsageError, match="schedule has 3 steps"):
        cur.next(0)
    with pytest.raises(UsageError, match="CachePlan or a Schedule"):
        ScheduleCursor(CacheConfig(mode=2))
