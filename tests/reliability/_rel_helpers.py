"""Helpers shared by the reliability tests (imported as a plain module; fixtures live in conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# Tiny calibration: seconds on a loaded 2-core machine.
SMALL = ["--calib-prompts", "4", "--calib-steps", "4", "--calib-bins", "2", "--calib-batch", "4"]
FAST_BENCH = ["--iterations", "2", "--warmup", "0"]


def build_config():
    """The ``BuildConfig`` equal to ``slimexport build --model tiny *SMALL *FAST_BENCH``."""
    from slimexport.config import AllocConfig, BenchConfig, BuildConfig, CalibConfig, CompressConfig

    calib = CalibConfig(num_prompts=4, num_steps=4, num_bins=2, batch_size=4)
    return BuildConfig(compress=CompressConfig(model="tiny", calib=calib, alloc=AllocConfig(budget=0.73)),
                       bench=BenchConfig(iterations=2, warmup=0))


def copy_build(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def write_manifest(folder: Path, data: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(data, indent=2))


def strip_timings(report: dict) -> dict:
    """A report without what differs between two identical runs: stage timings and cache flags, and the measured
    latencies (reports carry no timestamps; ``manifest.json`` does)."""
    rep = json.loads(json.dumps(report))
    rep.pop("stages", None)
    speed = rep.get("speed") or {}
    for k in ("dense_ms", "slim_ms", "speedup", "speedup_ci95", "timed_seconds"):
        speed.pop(k, None)
    return rep
