"""Which denoising steps run the full UNet and which the shallow path: the cache config, the rule, the schedule.

- :class:`~slimexport.config.CacheConfig` (in the config module, nested in ``BuildConfig``): the user's choice
  (``--cache auto|off|N``, the depth, the threshold), validated.
- :class:`CachePlan`: the rule that decides, step by step, from the config and (for ``auto``) a measured
  :class:`~slimexport.stepcache.measure.ChangeProfile`. It decides by *timestep*, so one plan serves any step
  count and scheduler: ``interval N`` runs the full UNet at steps 0, N, 2N, ... (DeepCache's uniform schedule);
  ``auto`` runs it when the predicted accumulated change of the cached feature since the last full step
  (:meth:`ChangeProfile.predicted`, the measured change rate integrated over the timesteps in between) would
  exceed ``threshold``, or after ``max_interval`` steps.
- :class:`Schedule`: the decisions for one list of timesteps (a deployment's ``num_inference_steps``).
- :class:`ScheduleCursor`: follows a plan or schedule call by call, detecting each new generation.
- ``schedule.json`` (:func:`write_schedules` / :func:`read_schedule`): the plans of a build's UNets with their
  schedules for the configured step counts, versioned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slimexport.artifacts import read_json, write_json
from slimexport.config import CacheConfig, _is_int
from slimexport.errors import ArtifactError, UsageError
from slimexport.stepcache.measure import ChangeProfile

SCHEDULE_FORMAT = "slimexport.stepcache.schedule/1"
SCHEDULE_FILE = "schedule.json"
def _check_steps(num_steps) -> int:
    if not _is_int(num_steps) or num_steps < 1:
        raise UsageError(f"a step-cache schedule for {num_steps!r} steps", "pass a number of inference steps >= 1")
    return num_steps


@dataclass(frozen=True)
class Schedule:
    """The full/shallow decision of every step of one sampling run.

    Attributes:
        depth: the shallow path's depth.
        full: ``full[i]``: step ``i`` runs the full UNet (and refreshes the cache); step 0 always does.
        timesteps: the sampler's timestep at each step (empty when the schedule is by step index only).
    """

    depth: int
    full: tuple[bool, ...]
    timesteps: tuple[float, ...] = ()

    def __post_init__(self):
        _check_steps(len(self.full))
        if not (_is_int(self.depth) and self.depth >= 1):
            raise UsageError(f"schedule depth {self.depth!r} is invalid", "use a cache depth >= 1")
        if not self.full[0]:
            raise UsageError("a step-cache schedule must run the full UNet at step 0 (there is no cache yet)",
                             "mark the first step full")
        if self.timesteps and len(self.timesteps) != len(self.full):
            raise UsageError(f"schedule has {len(self.full)} steps but {len(self.timesteps)} timesteps",
                             "give one timestep per step")

    @classmethod
    def uniform(cls, num_steps: int, interval: int, depth: int) -> Schedule:
        """DeepCache's uniform schedule: full at steps 0, N, 2N, ..."""
        _check_steps(num_steps)
        return cls(depth, tuple(i % interval == 0 for i in range(num_steps)))

    @property
    def num_steps(self) -> int:
        return len(self.full)

    @property
    def num_full(self) -> int:
        return sum(self.full)

    def relative_cost(self, shallow_cost: float) -> float:
        """Time of a run under this schedule over the uncached run's, if a shallow call costs ``shallow_cost`` of a full one."""
        return (self.num_full + (self.num_steps - self.num_full) * shallow_cost) / self.num_steps

    def pattern(self) -> str:
        """``F`` and ``s`` per step, e.g. ``FssFssF``."""
        return "".join("F" if f else "s" for f in self.full)

    def to_dict(self) -> dict:
        return {"depth": self.depth, "num_steps": self.num_steps, "num_full": self.num_full, "pattern": self.pattern(),
                "timesteps": list(self.timesteps)}

    @classmethod
    def from_dict(cls, d: dict) -> Schedule:
        return cls(int(d["depth"]), tuple(c == "F" for c in d["pattern"]), tuple(d.get("timesteps", ())))


@dataclass(frozen=True)
class CachePlan:
    """The rule that decides each step: a config and, for ``auto``, the measured change of the UNet it runs.

    Raises:
        UsageError: ``mode`` off (nothing to plan), or ``auto`` without a profile that measured ``depth``.
    """

    config: CacheConfig
    profile: ChangeProfile | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.config.enabled:
            raise UsageError("a step-cache plan needs caching on (CacheConfig.mode is 'off')", "set mode to auto or an interval N")
        if self.config.mode == "auto":
            if self.profile is None:
                raise UsageError("CacheConfig.mode 'auto' needs a measured change profile",
                                 "measure it with slimexport.stepcache.measure.measure_change, or use an interval N")
            self.profile.row(self.depth)  # raises when the depth was not measured

    @property
    def depth(self) -> int:
        return self.config.depth

    def is_full(self, index: int, t: float, last_full_index: int, last_full_t: float) -> bool:
        """Step ``index`` at timestep ``t``, the last full step being ``last_full_index`` at ``last_full_t``."""
        if index == 0:
            return True
        if self.config.interval is not None:
            return index % self.config.interval == 0
        if index - last_full_index >= self.config.max_interval:
            return True
        return self.profile.predicted(self.depth, t, last_full_t) > self.config.threshold

    def schedule(self, timesteps) -> Schedule:
        """The schedule of a run over ``timesteps`` (the sampler's, in order)."""
        ts = [float(t) for t in timesteps]
        _check_steps(len(ts))
        full, last = [], (0, ts[0])
        for i, t in enumerate(ts):
            f = self.is_full(i, t, *last)
            full.append(f)
            if f:
                last = (i, t)
        return Schedule(self.depth, tuple(full), tuple(ts))

    def schedule_for_steps(self, num_steps: int, make_scheduler) -> Schedule:
        """The schedule of a ``num_steps`` run of the scheduler ``make_scheduler()`` makes (mapped by timestep)."""
        _check_steps(num_steps)
        sched = make_scheduler()
        sched.set_timesteps(num_steps)
        return self.schedule([float(t) for t in sched.timesteps])

    def to_dict(self, make_scheduler=None) -> dict:
        """The plan, and (given the model's scheduler factory) its schedules for ``config.steps``."""
        out = {"config": self.config.to_dict(), "depth": self.depth, "describe": self.config.describe(),
               "profile": self.profile.to_dict() if self.profile is not None else None, "meta": self.meta}
        if make_scheduler is not None:
            out["schedules"] = {str(n): self.schedule_for_steps(n, make_scheduler).to_dict() for n in self.config.steps}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> CachePlan:
        prof = d.get("profile")
        return cls(CacheConfig.from_dict(d["config"]), ChangeProfile.from_dict(prof) if prof else None, dict(d.get("meta", {})))


def write_schedules(path: str | Path, plans: dict[str, CachePlan], make_scheduler=None) -> Path:
    """``schedule.json``: ``{"format", "unets": {name: plan}}`` (with each plan's schedules when ``make_scheduler``)."""
    return write_json(path, {"format": SCHEDULE_FORMAT, "unets": {k: p.to_dict(make_scheduler) for k, p in plans.items()}})


def read_schedule(path: str | Path, name: str | None = None) -> CachePlan | dict[str, CachePlan]:
    """The plan of UNet ``name`` from ``schedule.json`` (a build folder or the file), or every plan when ``name`` is ``None``.

    Raises:
        ArtifactError: not a schedule file of this version. UsageError: no plan of that name.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SCHEDULE_FILE
    d = read_json(path, "step-cache schedule")
    if not isinstance(d, dict) or d.get("format") != SCHEDULE_FORMAT:
        raise ArtifactError(f"{path} is not a step-cache schedule (format {SCHEDULE_FORMAT} expected)",
                            "rebuild with --cache (slimexport build)")
    plans = {k: CachePlan.from_dict(v) for k, v in d["unets"].items()}
    if name is None:
        return plans
    if name not in plans:
        raise UsageError(f"{path} has no step-cache plan for {name!r} (it has {', '.join(sorted(plans))})",
                         f"pass one of {', '.join(sorted(plans))}")
    return plans[name]


class ScheduleCursor:
    """Follows a :class:`CachePlan` (any step count) or a fixed :class:`Schedule` one UNet call at a time.

    A call starts a new generation when it is the first, when its timestep is not below the previous call's (a
    sampler's timesteps decrease within a run), when the input's shape, dtype or device changed, or after
    :meth:`reset`. Samplers that repeat a timestep (Heun-type) are therefore seen as restarting: every step full.

    Attributes:
        history: ``F``/``s`` per call of the current generation.
        calls_full, calls_shallow: counts over the cursor's life.
    """

    def __init__(self, plan: CachePlan | Schedule):
        if not isinstance(plan, (CachePlan, Schedule)):
            raise UsageError(f"step caching follows a CachePlan or a Schedule, got {type(plan).__name__}",
                             "pass slimexport.stepcache.CachePlan(...) or a Schedule")
        self.plan = plan
        self.depth = plan.depth
        self.calls_full = self.calls_shallow = 0
        self.reset()

    def reset(self) -> None:
        """Forget the current generation: the next call runs the full UNet."""
        self.index = 0
        self.history = ""
        self._last_t: float | None = None
        self._last_full = (0, 0.0)
        self._key = None

    def next(self, t: float, key=None) -> bool:
        """Whether the call at timestep ``t`` (``key``: the input's shape/dtype/device) runs the full UNet."""
        t = float(t)
        if self._last_t is None or t >= self._last_t or key != self._key:
            self.reset()
        i = self.index
        if isinstance(self.plan, Schedule):
            if i >= self.plan.num_steps:
                raise UsageError(f"the step-cache schedule has {self.plan.num_steps} steps and the sampler called a "
                                 f"{i + 1}th time", "make the schedule for the pipeline's num_inference_steps, or pass a "
                                 "CachePlan (it decides by timestep for any step count)")
            full = self.plan.full[i]
        else:
            full = self.plan.is_full(i, t, *self._last_full)
        if full:
            self._last_full = (i, t)
            self.calls_full += 1
        else:
            self.calls_shallow += 1
        self.index, self._last_t, self._key = i + 1, t, key
        self.history += "F" if full else "s"
        return full
