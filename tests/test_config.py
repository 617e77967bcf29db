"""Configs: frozen, validated on construction (messages name field, value and range), versioned round trips."""

import dataclasses

import pytest

from slimexport.config import (
    AllocConfig,
    BenchConfig,
    BuildConfig,
    CalibConfig,
    CompressConfig,
    DecomposeConfig,
    ExportConfig,
    VerifyConfig,
)
from slimexport.errors import ConfigError, UsageError

ALL = (AllocConfig, BenchConfig, BuildConfig, CalibConfig, CompressConfig, DecomposeConfig, ExportConfig, VerifyConfig)


@pytest.mark.parametrize("cls", ALL)
def test_defaults_round_trip_and_are_frozen(cls):
    cfg = cls() if cls is not AllocConfig else cls(budget=0.73)
    d = cfg.to_dict()
    assert d["version"] and cls.from_dict(d) == cfg
    field = dataclasses.fields(cfg)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, field, None)


def test_nested_changes_round_trip():
    cfg = BuildConfig(compress=CompressConfig(model="digits", alloc=AllocConfig(budget=0.5, method="greedy")),
                      bench=BenchConfig(target_ci=0.05, max_seconds=5), pipeline=False)
    assert BuildConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_keys_and_other_versions_are_refused():
    with pytest.raises(UsageError, match="budgett"):
        AllocConfig.from_dict({"budget": 0.5, "budgett": 0.4})
    with pytest.raises(UsageError, match="--dump-config"):
        AllocConfig.from_dict({"budget": 0.5, "version": 999})


@pytest.mark.parametrize("make, field", [
    (lambda: AllocConfig(budget=0.0), "budget"),
    (lambda: BenchConfig(target_ci=1.5), "target_ci"),
    (lambda: BenchConfig(max_seconds=0), "max_seconds"),
    (lambda: VerifyConfig(max_eps_error=-1), "max_eps_error"),
    (lambda: BuildConfig(pipeline="yes"), "pipeline"),
])
def test_invalid_values_name_the_field(make, field):
    with pytest.raises(ConfigError, match=field):
        make()
