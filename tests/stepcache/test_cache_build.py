"""``slimexport build --cache N``: the pair, schedule.json, the pair's parity, cached fidelity and per-image speed."""

from __future__ import annotations

import json

import pytest

from slimexport.api import build
from slimexport.config import BenchConfig, BuildConfig, CacheConfig, CalibConfig, CompressConfig
from slimexport.errors import UsageError
from slimexport.models import load_model
from slimexport.stepcache.build import check_cache_settings, timing_steps

CFG = BuildConfig(compress=CompressConfig(model="tiny", calib=CalibConfig(num_prompts=4, num_steps=4, num_bins=2, batch_size=4)),
                  bench=BenchConfig(iterations=5, warmup=1), cache=CacheConfig(mode=2, steps=(4, 6)))


@pytest.fixture(scope="module")
def cached_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("cached") / "b"
    return build(CFG, out=out, progress=False, cache_dir=out.parent / "cache")


def test_cached_build_writes_the_pair_and_checks_it(cached_build):
    out, rep = cached_build.out_dir, cached_build.report
    for name in ("dense", "slim"):
        for graph in ("full", "shallow"):
            assert (out / "onnx" / f"{name}-cache" / graph / "model.onnx").is_file()
    sched = json.loads((out / "schedule.json").read_text())
    assert sched["unets"]["slim"]["schedules"]["6"]["pattern"] == "FsFsFs"
    check = rep["stepcache"]["check"]
    for graphs in check["parity"].values():  # the engines reproduce PyTorch's split UNet
        assert graphs["full"]["passed"] and graphs["shallow"]["passed"]
        assert graphs["full"]["cosine"] > 0.9999 and graphs["shallow"]["cosine"] > 0.9999
    fid = check["fidelity"]
    assert set(fid) == {"slim", "cached", "cached+slim"}
    assert fid["cached"]["pattern"] == "FsFsFsFsFs"  # the verification trajectory: 10 steps, by the plan
    assert 0.8 <= fid["cached"]["final_cosine"] <= 1.0 and fid["cached"]["final_rel_l2"] > 0  # reuse changes the result
    per = check["per_image"]
    assert per["steps"] == 6 and per["variants"]["cached"]["pattern"] == "FsFsFs"
    assert per["speedup"]["dense"] == 1.0 and all(v > 0 for v in per["speedup"].values())
    assert rep["passed"] is check["passed"] is True
    md = (out / "report.md").read_text()
    assert "## Step caching" in md and "cached+slim" in md


def test_cached_build_rerun_reuses_the_cache_stages(cached_build):
    again = build(CFG, out=cached_build.out_dir, progress=False, cache_dir=cached_build.out_dir.parent / "cache")
    assert again.report["stages"]["stepcache"]["cached"] and again.report["stages"]["stepcache_check"]["cached"]
    assert again.report["stepcache"]["check"]["per_image"] == cached_build.report["stepcache"]["check"]["per_image"]


def test_bad_cache_settings_are_refused_before_work():
    unet = load_model("tiny").unet
    with pytest.raises(UsageError, match="--cache-depth.*outside 1..2"):
        check_cache_settings(CFG.replace(cache=CacheConfig(mode=2, depth=3)), unet)
    with pytest.raises(UsageError, match="--backend onnxruntime"):
        check_cache_settings(CFG.replace(backend="torch-compile"), unet)
    for backend in ("torch", "aoti", "tensorrt", "openvino"):
        check_cache_settings(CFG.replace(backend=backend), unet)
    check_cache_settings(CFG.replace(backend="torch-compile", cache=CacheConfig()), unet)  # off: anything goes


def test_timing_uses_the_middle_step_count():
    assert timing_steps((10, 25, 50)) == 25 and timing_steps((50, 10)) == 50 and timing_steps((7,)) == 7
