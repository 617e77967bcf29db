"""cache_stage: what a build gets from --cache (schedule.json, profiles, pairs, the manifest record)."""

from __future__ import annotations

import json

import pytest

from slimexport.config import CalibConfig
from slimexport.errors import UsageError
from slimexport.stepcache import CacheConfig, read_schedule
from slimexport.stepcache.api import cache_stage

CALIB = CalibConfig(num_prompts=2, num_steps=4, num_bins=2, batch_size=2)


def test_off_does_nothing(tiny, tmp_path):
    rec = cache_stage(tiny, {"dense": tiny.unet}, tmp_path, CacheConfig())
    assert rec["describe"] == "off" and "unets" not in rec
    assert list(tmp_path.iterdir()) == []


def test_auto_measures_each_unet_and_writes_the_schedule(tiny, slim_tiny_unet, tmp_path):
    cfg = CacheConfig(mode="auto", threshold=0.5, steps=(10, 25), measure_prompts=2)
    rec = cache_stage(tiny, {"dense": tiny.unet, "slim": slim_tiny_unet}, tmp_path, cfg,
                      prompts=["a red fox", "a blue sky", "unused"], calib=CALIB, export=False)
    assert set(rec["unets"]) == {"dense", "slim"}
    for name in ("dense", "slim"):
        entry = rec["unets"][name]
        assert (tmp_path / entry["profile"]).exists() and set(entry["change"]) == {"1", "2"}
        assert set(entry["schedules"]) == {"10", "25"} and entry["schedules"]["25"][0] == "F"
        assert "pair" not in entry
    plans = read_schedule(tmp_path)
    assert plans["dense"].profile.meta["prompts"] == 2
    assert plans["slim"].schedule_for_steps(25, tiny.make_scheduler).pattern() == rec["unets"]["slim"]["schedules"]["25"]
    assert rec["schedule"]["path"] == "schedule.json" and len(rec["schedule"]["sha256"]) == 64
    json.dumps(rec)  # the manifest record is plain JSON


def test_interval_needs_no_measurement(tiny, tmp_path):
    rec = cache_stage(tiny, {"dense": tiny.unet}, tmp_path, CacheConfig(mode=3, steps=(10,)), export=False)
    assert rec["unets"]["dense"] == {"profile": None, "change": None, "schedules": {"10": "FssFssFssF"}}


def test_bad_depth_fails_before_any_work(tiny, tmp_path):
    with pytest.raises(UsageError) as err:
        cache_stage(tiny, {"dense": tiny.unet}, tmp_path, CacheConfig(mode=2, depth=5))
    assert "UNet 'dense'" in str(err.value) and "1..2" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="CalibConfig"):
        cache_stage(tiny, {"dense": tiny.unet}, tmp_path, CacheConfig(mode="auto"), export=False)


def test_export_records_each_pair(tiny, slim_tiny_unet, tmp_path, monkeypatch):
    """The pair export itself is tested in test_cache_export.py; here: one per UNet, where the record says."""
    import slimexport.stepcache.api as api

    calls = []

    def fake_export(unet, folder, depth, **kw):
        calls.append((unet, folder, depth, kw["dtype"]))
        files = {"onnx_sha256": "a" * 64, "data_sha256": "b" * 64, "size_bytes": 1, "export_seconds": 0.1}
        return {"depth": depth, "cache_channels": 64, "cache_scale": 1, "full": files, "shallow": files}

    monkeypatch.setattr(api, "export_cache_pair", fake_export)
    rec = cache_stage(tiny, {"dense": tiny.unet, "slim": slim_tiny_unet}, tmp_path, CacheConfig(mode=2), dtype="fp16")
    assert [(c[0], c[1], c[2], c[3]) for c in calls] == [(tiny.unet, tmp_path / "onnx" / "dense-cache", 1, "fp16"),
                                                         (slim_tiny_unet, tmp_path / "onnx" / "slim-cache", 1, "fp16")]
    assert rec["unets"]["slim"]["pair"]["path"] == "onnx/slim-cache"
    assert rec["unets"]["slim"]["pair"]["shallow"]["onnx_sha256"] == "a" * 64
