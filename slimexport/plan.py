"""The rank plan: the typed hand-off from allocation to decomposition, with a versioned JSON form (``plan.json``).

``RankPlan`` is frozen: what the decomposition learns (relative errors, Cholesky fallbacks, MACs) makes a new plan
(:meth:`RankPlan.decomposed`) instead of editing the old one. It reads as the mapping ``plan.json`` holds
(``plan["ranks"]``), so reports and tools that read the JSON read the object alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from slimexport.errors import ArtifactError, IncompatibleArtifactError

PLAN_FORMAT = "slimexport.plan/1"
SLIM_FORMAT = "slimexport.slim/1"


def plan_weights(bin_weights) -> list[float]:
    """Timestep-bin weights as the plan records them (rounded to 6 decimals). The greedy allocation's error curves
    aggregate with these too, so that they and the decomposition factor the very same matrices."""
    return [round(float(x), 6) for x in bin_weights]


class _ReadsAsJson(Mapping):
    """A typed artifact that reads as its JSON form (``obj["key"]``), for code and tools that read the JSON."""

    def to_dict(self) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


@dataclass(frozen=True)
class ModulePlan:
    """One planned module: its rank and what the allocation and decomposition know of it.

    Attributes:
        kind: its kind (``slimexport.models.kinds.KINDS``); rank, max_rank, keep (= rank / max_rank).
        unit_cost: parameters per unit of rank; alloc_cost: the cost per unit the budget counted (parameters or MACs).
        quantum, r_min: its rank step and floor; score: spectral influence score; softmax: its softmax weight.
        timestep_weights: per timestep bin, the weights its correlations are aggregated with.
        rel_error: whitened error at the rank over the error at rank 0 (from the greedy curves or the decomposition).
        weight: the greedy allocation's output-energy weight (greedy only).
    """

    kind: str
    rank: int
    max_rank: int
    keep: float
    unit_cost: int
    alloc_cost: int
    quantum: int
    r_min: int
    score: float
    softmax: float
    timestep_weights: list[float]
    rel_error: float | None = None
    weight: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if v is not None or k not in ("rel_error", "weight")}


@dataclass(frozen=True)
class RankPlan(_ReadsAsJson):
    """Ranks per module under one budget (``plan.json``).

    Attributes:
        budget, scope, metric: the budget as asked (``AllocConfig``); targeted_budget: as a fraction of the targets.
        targets: the ``--targets`` groups; ranks: module id → rank.
        modules: module id → :class:`ModulePlan`.
        params: parameter counts (targeted and whole UNet, dense and slim; the target and the largest step).
        allocation: how the ranks were chosen (method, metric, the target and what was kept in its units).
        cholesky_fallbacks, macs: set by :meth:`decomposed`.
    """

    budget: float
    scope: str
    metric: str
    targeted_budget: float
    targets: list[str]
    ranks: dict[str, int]
    modules: dict[str, ModulePlan]
    params: dict[str, Any]
    allocation: dict[str, Any]
    cholesky_fallbacks: int | None = None
    macs: dict[str, Any] | None = None
    format: str = field(default=PLAN_FORMAT)

    def to_dict(self) -> dict:
        """The JSON form (keys as ``plan.json`` has always had them, ``format`` last)."""
        out = {"budget": self.budget, "scope": self.scope, "metric": self.metric, "targeted_budget": self.targeted_budget,
               "targets": list(self.targets), "ranks": dict(self.ranks),
               "modules": {k: m.to_dict() for k, m in self.modules.items()}, "params": dict(self.params),
               "allocation": dict(self.allocation)}
        if self.cholesky_fallbacks is not None:
            out["cholesky_fallbacks"] = self.cholesky_fallbacks
        if self.macs is not None:
            out["macs"] = dict(self.macs)
        out["format"] = self.format
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> RankPlan:
        """Read ``plan.json`` (also one written before the format was versioned)."""
        fmt = d.get("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise IncompatibleArtifactError(f"rank plan format {fmt!r}; this slimexport reads {PLAN_FORMAT!r}",
                                            "rebuild it with this slimexport version")
        known = set(ModulePlan.__dataclass_fields__)
        return cls(budget=d["budget"], scope=d["scope"], metric=d["metric"], targeted_budget=d["targeted_budget"],
                   targets=list(d["targets"]), ranks=dict(d["ranks"]),
                   modules={k: ModulePlan(**{f: v for f, v in m.items() if f in known}) for k, m in d["modules"].items()},
                   params=dict(d["params"]), allocation=dict(d["allocation"]),
                   cholesky_fallbacks=d.get("cholesky_fallbacks"), macs=d.get("macs"))

    def decomposed(self, rel_error: Mapping[str, float], cholesky_fallbacks: int, macs: dict) -> RankPlan:
        """A new plan with the decomposition's relative error per module, its Cholesky fallbacks and the MACs."""
        modules = {k: replace(m, rel_error=rel_error[k]) if k in rel_error else m for k, m in self.modules.items()}
        return replace(self, modules=modules, cholesky_fallbacks=cholesky_fallbacks, macs=macs)

    def timestep_weights(self, name: str) -> list[float] | None:
        m = self.modules.get(name)
        return None if m is None else m.timestep_weights


@dataclass(frozen=True)
class SlimPlan(_ReadsAsJson):
    """What ``slim_plan.json`` holds beside a slim UNet's weights: its shapes per unit (``slimexport.slim.shapes``),
    the weights file and sha256, the parameter count and provenance (the compress run's model, budget and ranks).

    Reads as its JSON form, like :class:`RankPlan`."""

    shapes: dict[str, dict]
    weights: dict[str, str]
    params: int
    plan: dict[str, Any] = field(default_factory=dict)
    slimexport_version: str = ""
    format: str = SLIM_FORMAT

    def to_dict(self) -> dict:
        return {"format": self.format, "slimexport_version": self.slimexport_version, "shapes": self.shapes,
                "weights": dict(self.weights), "params": self.params, "plan": dict(self.plan)}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "slim plan") -> SlimPlan:
        if d.get("format") != SLIM_FORMAT:
            raise IncompatibleArtifactError(f"{where} has slim format {d.get('format')!r}; this slimexport reads {SLIM_FORMAT!r}",
                                            "rebuild the slim UNet with this version (slimexport compress)")
        try:
            return cls(shapes=dict(d["shapes"]), weights=dict(d["weights"]), params=int(d["params"]),
                       plan=dict(d.get("plan") or {}), slimexport_version=str(d.get("slimexport_version", "")))
        except (KeyError, TypeError, ValueError) as err:
            raise ArtifactError(f"{where} lacks or mistypes {err}", "rebuild the slim UNet (slimexport compress)") from err
