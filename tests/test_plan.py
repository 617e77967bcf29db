"""The typed rank and slim plans: versioned JSON round trips that keep plan.json's keys, and no editing in place."""

import dataclasses

import pytest

from slimexport.errors import ArtifactError, IncompatibleArtifactError
from slimexport.plan import PLAN_FORMAT, ModulePlan, RankPlan, SlimPlan

MODULE = {"kind": "ff", "rank": 32, "max_rank": 64, "keep": 0.5, "unit_cost": 97, "alloc_cost": 97, "quantum": 4,
          "r_min": 8, "score": 1.5, "softmax": 0.2, "timestep_weights": [0.5, 0.5]}
OLD = {"budget": 0.73, "scope": "targeted", "metric": "params", "targeted_budget": 0.73, "targets": ["ffn"],
       "ranks": {"b.ff": 32}, "modules": {"b.ff": MODULE}, "params": {"targeted_dense": 6208, "targeted_slim": 3104},
       "allocation": {"method": "softmax"}}


def test_a_plan_written_before_versioning_reads_and_writes_back_its_keys():
    plan = RankPlan.from_dict(OLD)
    assert isinstance(plan.modules["b.ff"], ModulePlan) and plan["ranks"] == {"b.ff": 32}
    out = plan.to_dict()
    assert out.pop("format") == PLAN_FORMAT and out == OLD  # same keys, same values, nothing added but the format
    assert RankPlan.from_dict(plan.to_dict()) == plan


def test_decomposing_makes_a_new_plan():
    plan = RankPlan.from_dict(OLD)
    done = plan.decomposed({"b.ff": 0.01}, 0, {"dense": 10, "slim": 8})
    assert done is not plan and plan.modules["b.ff"].rel_error is None and plan.macs is None
    assert done["modules"]["b.ff"]["rel_error"] == 0.01 and done["macs"]["slim"] == 8 and done["cholesky_fallbacks"] == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.budget = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan["budget"] = 0.5  # type: ignore[index]


def test_another_format_is_refused():
    with pytest.raises(IncompatibleArtifactError, match="rebuild"):
        RankPlan.from_dict({**OLD, "format": "slimexport.plan/9"})
    with pytest.raises(IncompatibleArtifactError, match="slimexport.slim/1"):
        SlimPlan.from_dict({"format": "slimexport.slim/0"})
    with pytest.raises(ArtifactError, match="'weights'"):
        SlimPlan.from_dict({"format": "slimexport.slim/1", "shapes": {}, "params": 1})
    slim = SlimPlan(shapes={"b": {"ffn_width": 32}}, weights={"file": "w", "sha256": "0"}, params=5)
    assert SlimPlan.from_dict(slim.to_dict()) == slim and slim["shapes"]["b"]["ffn_width"] == 32
