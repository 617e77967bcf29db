from __future__ import annotations

import math

import numpy as np
import pytest

from slimexport.errors import ConfigError, UsageError
from slimexport.verify.metrics import (
    DEFAULT_TOLERANCES,
    REL_EPS,
    REL_L2_FLOOR,
    Tolerance,
    compare,
    compare_outputs,
    relative_l2,
)

LOOSE = Tolerance(atol=10.0, rtol=10.0, min_cosine=-1.0, min_sqnr_db=None)


def test_hand_computed_example():
    a = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    b = np.array([1.0, 2.0, 3.0, 5.0], dtype=np.float32)
    m = compare(a, b, LOOSE)
    assert m["max_abs"] == 1.0
    assert m["mean_abs"] == 0.25
    assert m["max_rel"] == pytest.approx(1.0 / (5.0 + REL_EPS))
    assert m["p99_abs"] == pytest.approx(0.97)  # linear interpolation at 0.99 * 3 = 2.97 between 0 and 1
    assert m["cosine"] == pytest.approx(34.0 / math.sqrt(30.0 * 39.0))
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(39.0))  # sum b^2 = 39, sum e^2 = 1
    assert m["nan_count"] == m["inf_count"] == 0
    assert m["numel"] == 4 and m["shape"] == [4]
    assert m["passed"] and m["failed"] == [] and m["reason"] is None


def test_elementwise_fails_only_where_abs_and_rel_both_exceed():
    tol = Tolerance(atol=0.1, rtol=1e-3, min_cosine=0.0)
    # abs error 0.5 > atol but relative 5e-4 < rtol: passes (a large value); abs 0.05 < atol: passes (a small value)
    m = compare(np.array([1000.5, 0.05]), np.array([1000.0, 0.0]), tol)
    assert m["elementwise_fail_fraction"] == 0.0 and m["passed"]
    # abs 0.5 > atol and rel 0.5 > rtol: fails
    m = compare(np.array([1000.5, 1.5]), np.array([1000.0, 1.0]), tol)
    assert m["elementwise_fail_fraction"] == 0.5
    assert m["failed"] == ["elementwise"] and "atol=0.1" in m["reason"]
    allow = Tolerance(atol=0.1, rtol=1e-3, min_cosine=0.0, max_fail_fraction=0.5)
    assert compare(np.array([1000.5, 1.5]), np.array([1000.0, 1.0]), allow)["passed"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_always_fail(bad):
    a = np.ones(8, dtype=np.float16)
    a[3] = bad
    m = compare(a, np.ones(8, dtype=np.float32), LOOSE)
    assert not m["passed"] and "finite" in m["failed"]
    assert m["nan_count"] + m["inf_count"] == 1
    assert m["max_abs"] == 0.0  # the other, finite elements still compared
    assert "NaN" in m["reason"]


def test_nan_in_reference_fails():
    b = np.ones(4)
    b[0] = np.nan
    m = compare(np.ones(4), b, LOOSE)
    assert not m["passed"] and m["ref_nan_count"] == 1 and "reference" in m["reason"]


def test_all_nan_has_no_metrics_and_fails():
    m = compare(np.full(3, np.nan), np.ones(3), LOOSE)
    assert not m["passed"] and m["max_abs"] is None and m["failed"] == ["finite"]


def test_identical_and_zero():
    x = np.random.default_rng(0).standard_normal(100)
    m = compare(x, x, "fp32")
    assert m["max_abs"] == 0.0 and m["sqnr_db"] == math.inf and m["cosine"] == pytest.approx(1.0) and m["passed"]
    z = compare(np.zeros(5), np.zeros(5), "fp32")
    assert z["cosine"] == 1.0 and z["passed"]
    one_zero = compare(np.zeros(5), np.ones(5), LOOSE)
    assert one_zero["cosine"] == 0.0


def test_cosine_and_sqnr_gates_name_the_metric():
    rng = np.random.default_rng(1)
    b = rng.standard_normal(10_000)
    noisy = b + 0.01 * rng.standard_normal(10_000)  # SQNR ~ 40 dB, cosine ~ 0.99995
    m = compare(noisy, b, Tolerance(atol=1.0, rtol=1.0, min_cosine=0.9, min_sqnr_db=50.0))
    assert m["sqnr_db"] == pytest.approx(40.0, abs=0.5)
    assert m["failed"] == ["sqnr_db"] and "SQNR" in m["reason"]
    m = compare(noisy, b, Tolerance(atol=1.0, rtol=1.0, min_cosine=0.99999))
    assert m["failed"] == ["cosine"]
    assert compare(noisy, b, "fp16")["passed"]
    assert not compare(noisy, b, "fp32")["passed"]


def test_fp32_noise_passes_fp32_gate():
    rng = np.random.default_rng(2)
    b = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
    a = b * (1 + 1e-6 * rng.standard_normal(b.shape)).astype(np.float32)
    assert compare(a, b, "fp32")["passed"]


def test_shape_mismatch_fails():
    m = compare(np.ones((2, 3)), np.ones((3, 2)), "fp32")
    assert not m["passed"] and m["failed"] == ["shape"]


def test_tolerance_defaults_and_validation():
    assert Tolerance.for_dtype("fp32") is DEFAULT_TOLERANCES["fp32"]
    fp32, fp16 = DEFAULT_TOLERANCES["fp32"], DEFAULT_TOLERANCES["fp16"]
    assert fp32.rtol <= 1e-4 and fp32.min_cosine >= 0.9999
    assert fp16.atol > fp32.atol and fp16.min_cosine < fp32.min_cosine
    with pytest.raises(UsageError):
        Tolerance.for_dtype("int4")
    with pytest.raises(ConfigError):
        Tolerance(atol=-1, rtol=0, min_cosine=0.9)
    with pytest.raises(ConfigError):
        Tolerance(atol=0, rtol=0, min_cosine=1.5)
    with pytest.raises(ConfigError):
        Tolerance(atol=0, rtol=0, min_cosine=0.9, min_sqnr_db=math.inf)
    with pytest.raises(AttributeError):
        fp32.atol = 1.0


def test_compare_outputs():
    ref = {"latent": np.ones(4)}
    assert compare_outputs({"latent": np.ones(4)}, ref)["passed"]
    res = compare_outputs({"out_sample": np.ones(4)}, ref)
    assert not res["passed"] and res["failed"] == ["latent"] and res["outputs"]["latent"]["failed"] == ["missing"]


def test_relative_l2_by_hand_on_arrays_and_tensors():
    import torch

    a = np.array([[3.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    b = np.array([[0.0, 0.0], [0.0, 4.0]], dtype=np.float32)
    assert relative_l2(a, b) == pytest.approx(5.0 / 4.0, rel=1e-12)  # ‖(3, -4)‖ / ‖4‖
    assert relative_l2(torch.from_numpy(a).half(), torch.from_numpy(b)) == pytest.approx(1.25, rel=1e-12)
    assert relative_l2(b, b) == 0.0
    assert relative_l2(a, np.zeros_like(a)) == pytest.approx(3.0 / REL_L2_FLOOR)  # finite for a zero reference
    assert math.isnan(relative_l2(np.array([np.nan, 1.0]), np.array([1.0, 1.0])))
    with pytest.raises(UsageError, match="same shape"):
        relative_l2(a, b.ravel())


def test_compare_fails_on_empty_outputs():
    m = compare(np.zeros(0), np.zeros(0), "fp32")
    assert not m["passed"] and m["failed"] == ["empty"] and "empty" in m["reason"]
