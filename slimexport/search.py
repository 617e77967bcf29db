"""``slimexport build --speedup S``: the largest budget (the smallest cut) whose *measured* speed-up reaches S.

Each trial is a whole build into the same folder at another budget: the calibration and the dense export are
reused by the stage cache, the slim UNet is rebuilt, exported, verified and timed on the engine (the build's own
bench, interleaved dense/slim). The search keeps the largest budget that reached S and the smallest that did not;
the next budget comes from the last measurements (the latency fraction taken as linear in the budget:
:func:`next_budget`), kept strictly between the two, or their midpoint; it stops when they are within ``tolerance`` of each
other, after ``max_trials`` builds, or when S cannot be reached (a budget below the allocation's floor, or the
floor's measured speed-up short of S). Trials skip the report's figures; the folder ends holding the build at
the chosen budget (with its figures, unless ``--no-figures``) and ``search.json`` (every trial: budget, measured
speed-up and interval, verdict) beside its report.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from pathlib import Path

from slimexport.artifacts import write_json
from slimexport.errors import TargetNotReachedError, UsageError

log = logging.getLogger("slimexport")

SEARCH_FILE = "search.json"
SEARCH_FORMAT = "slimexport.search/1"
DEFAULT_TRIALS = 5
DEFAULT_TOLERANCE = 0.02  # budgets this close count as one
FLOOR = re.compile(r"smallest feasible budget ([0-9.]+)")  # the allocation's refusal of a budget below its rank floors


def next_budget(points: list[tuple[float, float]], target: float, reached: float | None, missed: float | None,
                floor: float, tolerance: float = DEFAULT_TOLERANCE) -> float:
    """The next budget to try from the measured ``(budget, speed-up)`` points so far.

    The latency fraction ``1 / speed-up`` is taken as linear in the budget: through the last two points (a secant,
    which accounts for the time no cut touches), or through the origin with one point (``b · m / S``). The budget
    where it meets ``1 / target`` is kept strictly between the largest budget that reached the target (``reached``)
    and the smallest that missed it (``missed``; their midpoint when the estimate falls outside), and not below
    ``floor``; until one reaches it, the estimate is lowered by ``tolerance / 2`` so the search crosses over.
    """
    (b1, m1) = points[-1]
    guess = b1 * m1 / target
    if len(points) >= 2:
        (b0, m0) = points[-2]
        slope = (1 / m1 - 1 / m0) / (b1 - b0) if b1 != b0 else 0.0
        if slope > 0:
            guess = b1 + (1 / target - 1 / m1) / slope
    if reached is None:
        guess -= tolerance / 2
    lo = reached if reached is not None else floor
    hi = missed if missed is not None else 1.0
    if not lo < guess < hi:
        guess = 0.5 * (lo + hi)
    return round(max(guess, floor), 4)


def check_target(speedup) -> float:
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not 1.0 < speedup < 100:
        raise UsageError(f"--speedup {speedup!r} is not a speed-up", "pass a number above 1, e.g. --speedup 1.3")
    return float(speedup)


def speedup_search(cfg, target: float, out: str | Path, build: Callable, *, progress: bool = True, cache_dir=None,
                   max_trials: int = DEFAULT_TRIALS, tolerance: float = DEFAULT_TOLERANCE):
    """Builds at budgets chosen to reach ``target`` (measured p50 speed-up); returns the final ``BuildResult``.

    ``build``: :func:`slimexport.api.build` (called as ``build(cfg, out=..., budget=...)``).

    The first budget is ``1 / target`` (the cost fraction that would give the target if time were proportional to
    it; ``cfg``'s own budget is not used). Trials that fail their parity gate still count for speed; the
    final build's verdict is reported as usual.

    Raises:
        TargetNotReachedError: no budget reached ``target``; the folder holds the fastest build, ``search.json``
            every trial, and the message the best measured speed-up and what to change.
    """
    target = check_target(target)
    out = Path(out)
    floor = 0.0
    trials: list[dict] = []
    reached = missed = None  # largest budget that reached the target, smallest that missed it
    budget = round(1.0 / target, 4)
    results = {}
    while len(trials) < max_trials:
        log.info("speed target %.3gx: trial %d at budget %g", target, len(trials) + 1, budget)
        try:
            res = build(cfg, out=out, progress=progress, cache_dir=cache_dir, budget=budget, figures=False)
        except UsageError as err:
            below = FLOOR.search(err.message)
            if below is None:
                raise
            trials.append({"budget": budget, "refused": err.message})
            floor = math.ceil(float(below[1]) * 1e4) / 1e4  # the rank floors: nothing lower can be built
            if floor <= budget or any(t["budget"] == floor for t in trials):
                break
            budget = floor
            continue
        speed = res.report.get("speed") or {}
        m = float(speed.get("speedup", 0.0))
        results[budget] = res
        trials.append({"budget": budget, "speedup": m, "speedup_ci95": speed.get("speedup_ci95"),
                       "passed": res.report["passed"], "reached": m >= target})
        log.info("speed target %.3gx: budget %g measured %.3fx", target, budget, m)
        if m >= target:
            reached = budget if reached is None else max(reached, budget)
        else:
            missed = budget if missed is None else min(missed, budget)
        if reached is not None and missed is not None and missed - reached <= tolerance:
            break
        points = [(t["budget"], t["speedup"]) for t in trials if "speedup" in t]
        nxt = next_budget(points, target, reached, missed, floor, tolerance)
        if nxt in results or any(t["budget"] == nxt for t in trials):
            break
        budget = nxt
    return _finish(cfg, target, out, trials, results, reached, lambda b: build(cfg, out=out, progress=progress,
                                                                           cache_dir=cache_dir, budget=b))


def _finish(cfg, target, out: Path, trials: list[dict], results: dict, reached, rebuild: Callable):
    measured = [t for t in trials if "speedup" in t]
    best = max(measured, key=lambda t: t["speedup"]) if measured else None
    chosen = reached if reached is not None else (best["budget"] if best else None)
    res = results.get(chosen)
    # The folder ends at the chosen budget, with the figures the trials skipped (a rebuild of the last trial reuses
    # every stage but the figures).
    if res is not None and (measured[-1]["budget"] != chosen or cfg.figures):
        res = rebuild(chosen)
    record = {"format": SEARCH_FORMAT, "target": target, "reached": reached is not None, "chosen_budget": chosen,
              "trials": trials}
    if res is not None:  # what the folder's own bench says (re-timed when the chosen build was rebuilt)
        speed = res.report.get("speed") or {}
        record["final"] = {"budget": chosen, "speedup": speed.get("speedup"), "speedup_ci95": speed.get("speedup_ci95")}
        if reached is not None and (speed.get("speedup") or 0) < target:
            log.warning("the chosen budget %g reached %.3gx in its trial but %.3fx when the folder was re-timed: the "
                        "measurements are noisy at this size (the report gives the interval)", chosen, target,
                        speed.get("speedup") or 0)
    write_json(out / SEARCH_FILE, record)
    if res is not None:
        res.report["speed_target"] = record
    if reached is None:
        got = f"best measured {best['speedup']:.3f}x at budget {best['budget']:g}" if best else "no trial could be built"
        raise TargetNotReachedError(
            f"--speedup {target:g} not reached with --targets {','.join(cfg.compress.alloc.targets)} in {len(trials)} "
            f"trial(s): {got} ({out / SEARCH_FILE})",
            "add targets (--targets attn,ffn,resnet), add step caching (--cache auto), or ask for less")
    return res
