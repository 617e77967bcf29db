"""The stage runner: each stage of ``compress`` and ``build`` runs, or reuses what an earlier run wrote, here.

A stage is reused when the manifest records the same key (a content hash of its inputs, :func:`stage_key`) with
every file intact; else it is computed, its outputs written, and the manifest records them (after they are
complete, so a run killed mid-stage reruns that stage only). Every stage is timed into a :class:`StageRecord`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimexport.cache import Manifest, share_dir, stage_key
from slimexport.calibrate.stats import CalibStats
from slimexport.errors import SlimExportError

log = logging.getLogger("slimexport")
CPU = torch.device("cpu")


@dataclass
class StageRecord:
    seconds: float
    cached: bool
    peak_memory_mb: float | None = None


def _peak_rss_mb() -> float:
    import resource  # Unix only

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# A running stage says it is alive this often (an SD1.4 export takes about a minute with no output of its own).
HEARTBEAT_S = 15.0


@contextlib.contextmanager
def _heartbeat(name: str, t0: float) -> Iterator[None]:
    """Log ``[name] still running, N s`` every :data:`HEARTBEAT_S` seconds until the block ends."""
    every = HEARTBEAT_S
    done = threading.Event()

    def beat():
        while not done.wait(every):
            log.info("[%s] still running, %.0f s", name, time.perf_counter() - t0)

    thread = threading.Thread(target=beat, name=f"slimexport-{name}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextlib.contextmanager
def timed(records: dict[str, StageRecord], name: str, cached: bool, device: torch.device = CPU) -> Iterator[None]:
    """Time the stage ``name`` into ``records[name]`` (wall seconds, cache hit, peak GPU or process memory) and log
    it, with a line every :data:`HEARTBEAT_S` seconds while it runs; nothing is recorded when the stage raises."""
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log.info("[%s] %s", name, "cached" if cached else "running")
    with _heartbeat(name, t0):
        yield
    sec = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb()
    records[name] = StageRecord(seconds=sec, cached=cached, peak_memory_mb=round(peak, 1))
    log.info("[%s] done in %.1f s%s, peak %s memory %.0f MB", name, sec, " (cached)" if cached else "",
             "GPU" if device.type == "cuda" else "process", peak)


def run_stage(manifest: Manifest | None, records: dict[str, StageRecord], name: str, key: str,
              outputs: list[Path] | Callable[[Any], list[Path]], compute: Callable[[], Any],
              load: Callable[[], Any] | None = None, *, stage: str | None = None, device: torch.device = CPU,
              cached: bool | None = None, rerecord: bool = False, extra: Callable[[Any], dict] | None = None):
    """Run one stage, or reuse its outputs; timed into ``records[name]``.

    Args:
        manifest: the output folder's manifest; ``None`` records nothing (torch.distributed ranks other than 0).
        records: per stage, its :class:`StageRecord`.
        name: the stage's name in ``records`` and the log; ``stage``: its name in the manifest, where another.
        key: content hash of the stage's inputs.
        outputs: the files and folders ``compute`` writes (or a function of the stage's value that names them).
        compute: makes the stage's value, writing ``outputs``.
        load: the value read back from ``outputs`` when they are reused (``None``: a reused stage has no value).
        cached: the caller's reuse decision (``False``: an upstream stage was rebuilt); ``None``: reused when the
            manifest records ``key`` with intact files and every output exists.
        rerecord: record the stage after a reuse too (engines are made in every run; their info is this run's).
        extra: the record's fields besides key, files and seconds, from the stage's value.

    Returns:
        The value of ``compute`` or ``load``.
    """
    stage = stage or name
    if cached is None:
        cached = manifest.cached(stage, key) and (callable(outputs) or all(Path(p).exists() for p in outputs))
    with timed(records, name, cached, device):
        t0 = time.perf_counter()
        value = compute() if not cached else load() if load is not None else None
        if manifest is not None and (not cached or rerecord):
            files = outputs(value) if callable(outputs) else outputs
            manifest.record(stage, key, files, time.perf_counter() - t0, **(extra(value) if extra else {}))
    return value


def result_key(stage: str, engine_key: str, cfg) -> str:
    """Key of the ``verify`` or ``bench`` stage: its engines and its own settings (build and verify/bench DIR alike)."""
    return stage_key(stage, engine_key, getattr(cfg, stage).to_dict())


def calibration_cached(manifest: Manifest, key: str, stats_dir: Path, shared: Path) -> bool:
    """True when ``stats_dir`` holds statistics for ``key``, adopting (and checking) a shared copy if one exists."""
    if manifest.cached("calibrate", key):
        return True
    if not (shared / "stats.json").exists():
        return False
    try:
        share_dir(shared, stats_dir)
        CalibStats.load(stats_dir)  # verifies the digest before trusting the shared copy
        manifest.record("calibrate", key, [stats_dir], 0.0, shared_from=shared.name)
        return True
    except Exception as err:  # noqa: BLE001 - a bad shared copy is rebuilt, never trusted
        log.warning("shared calibration cache %s is unusable (%s); recalibrating", shared, err)
        return False


def share_calibration(stats_dir: Path, shared: Path) -> None:
    """Hard-link fresh statistics into the shared cache, where a new budget's build finds them."""
    try:
        share_dir(stats_dir, shared)
    except (OSError, SlimExportError) as err:  # the shared cache is optional: a full or read-only disk there is not fatal
        log.warning("could not share calibration statistics in %s (%s)", shared.parent.parent, err)
