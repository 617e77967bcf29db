"""The pipeline in a few readable calls: ``compress`` (stages A–F) and ``build`` (compress → export → engine →
verify → bench). Each stage is a function between artifacts, cached by a content hash of its inputs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimexport.artifacts import read_json, sha256_json, write_json
from slimexport.cache import Manifest, share_dir, stage_key
from slimexport.config import CompressConfig
from slimexport.distributed import broadcast, dist_info
from slimexport.errors import UsageError
from slimexport.models.bundle import move

log = logging.getLogger("slimexport")
DEFAULT_ROOT = Path("engines")


@dataclass
class StageRecord:
    seconds: float
    cached: bool
    peak_memory_mb: float | None = None


@dataclass
class CompressResult:
    """What ``compress`` returns.

    Attributes:
        out_dir: the output folder; ``slim_dir``: the slim UNet folder inside it (``load_slim_unet(slim_dir)``).
        plan: the rank plan (ranks, per-module diagnostics, parameter counts).
        stages: per stage, wall seconds and whether it was a cache hit.
    """

    out_dir: Path
    slim_dir: Path
    stats_dir: Path
    plan: dict
    stages: dict[str, StageRecord] = field(default_factory=dict)
    bundle: object = None

    def load_slim(self, device="cpu", dtype=torch.float32):
        from slimexport.slim.apply import load_slim_unet

        return load_slim_unet(self.slim_dir, device=device, dtype=dtype)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for, but no CUDA GPU is visible", "use --device cpu (or auto)")
    return d


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    if dt is not torch.float32 and device.type == "cpu":
        raise UsageError(f"--calib-dtype {name} on the CPU is slow and imprecise", "use --calib-dtype fp32 (or auto) on the CPU")
    return dt


def default_out(model: str, budget: float, suffix: str = "") -> Path:
    name = Path(model).name if Path(model).exists() else model.replace("/", "--")
    return DEFAULT_ROOT / f"{name}-b{budget:g}{suffix}"


def _peak_rss_mb() -> float:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _calibration_cached(manifest: Manifest, key: str, stats_dir: Path, shared: Path) -> bool:
    """True when ``stats_dir`` holds statistics for ``key``, adopting (and checking) a shared copy if one exists."""
    if manifest.cached("calibrate", key):
        return True
    if not (shared / "stats.json").exists():
        return False
    try:
        share_dir(shared, stats_dir)
        from slimexport.calibrate.stats import CalibStats

        CalibStats.load(stats_dir)  # verifies the digest before trusting the shared copy
        manifest.record("calibrate", key, [stats_dir], 0.0, shared_from=shared.name)
        return True
    except Exception as err:  # noqa: BLE001 - a bad shared copy is rebuilt, never trusted
        log.warning("shared calibration cache %s is unusable (%s); recalibrating", shared, err)
        return False


class _Stage:
    """Times a stage, logs it, fills ``StageRecord``s."""

    def __init__(self, records: dict, name: str, cached: bool, device: torch.device):
        self.records, self.name, self.cached, self.device = records, name, cached, device

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        log.info("[%s] %s", self.name, "cached" if self.cached else "running")
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            sec = time.perf_counter() - self.t0
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else _peak_rss_mb()
            self.records[self.name] = StageRecord(seconds=sec, cached=self.cached, peak_memory_mb=round(peak, 1))
            log.info("[%s] done in %.1f s%s, peak %s memory %.0f MB", self.name, sec, " (cached)" if self.cached else "",
                     "GPU" if self.device.type == "cuda" else "process", peak)
        return False


def compress(cfg: CompressConfig, out: str | Path | None = None, bundle=None, progress: bool = True,
             cache_dir: str | Path | None = None) -> CompressResult:
    """SlimDiff on one model: SlimSet → calibration → scores → rank plan → decompositions → slim UNet folder.

    Args:
        cfg: the whole compressor config.
        out: output folder (default ``engines/<model>-b<budget>``); holds ``calib/``, ``plan.json``,
            ``slim_unet/`` and ``manifest.json``.
        bundle: an already loaded model (else ``load_model(cfg.model, cfg.random_weights)``).
        cache_dir: where calibration statistics are shared between output folders (default ``engines/.cache``),
            so a new budget reuses them.

    Returns:
        :class:`CompressResult` (``None`` on ranks other than 0 under ``torch.distributed``).
    """
    from slimexport.models.load import load_model

    out_dir = Path(out) if out is not None else default_out(cfg.model, cfg.alloc.budget)
    cache_root = Path(cache_dir) if cache_dir is not None else DEFAULT_ROOT / ".cache"
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.calib_dtype, device)
    records: dict[str, StageRecord] = {}

    rank, world = dist_info()
    with _Stage(records, "load", False, torch.device("cpu")):
        bundle = bundle if bundle is not None else load_model(cfg.model, random_weights=cfg.random_weights)
    identity = {"model": cfg.model, "weights": bundle.identity()}
    calib_key = stage_key("calibrate", bundle.identity(), cfg.calib.to_dict(), str(dtype), device.type)
    stats_dir = out_dir / "calib"
    manifest = None
    cached = False
    if rank == 0:
        from slimexport.artifacts import ensure_dir

        ensure_dir(out_dir)
        manifest = Manifest(out_dir, identity=identity)
        manifest.set("model", {"name": cfg.model, "source": bundle.source, "fingerprint": bundle.identity()})
        manifest.set("config", cfg.to_dict())
        cached = _calibration_cached(manifest, calib_key, stats_dir, cache_root / "calib" / calib_key[:32])
    cached = broadcast(cached)

    # Stage A–B: calibration statistics (keyed by model + calibration settings + device class and dtype).
    # Under torch.distributed every rank calibrates a shard; rank 0 alone goes on to write and decompose.
    with _Stage(records, "calibrate", cached, device):
        from slimexport.calibrate import CalibStats, calibrate, select_prompts

        if cached:
            stats = CalibStats.load(stats_dir) if rank == 0 else None
        else:
            prompts = select_prompts(bundle, cfg.calib)
            stats = calibrate(bundle, prompts, cfg.calib, device=device, dtype=dtype, progress=progress)
            if rank == 0:
                stats.save(stats_dir)
                manifest.record("calibrate", calib_key, [stats_dir], stats.meta["seconds"])
                try:
                    share_dir(stats_dir, cache_root / "calib" / calib_key[:32])
                except OSError as err:
                    log.warning("could not share calibration statistics in %s (%s)", cache_root, err)
    if rank != 0:
        return None

    # Stage C–E: scores and the rank plan.
    unet = move(bundle.unet, device, torch.float32)
    plan_key = stage_key("plan", calib_key, cfg.decompose.to_dict(), cfg.alloc.to_dict())
    plan_path = out_dir / "plan.json"
    cached = manifest.cached("plan", plan_key)
    with _Stage(records, "allocate", cached, device):
        if cached:
            plan = read_json(plan_path, "rank plan")
        else:
            from slimexport.allocate.api import plan_ranks

            plan = plan_ranks(unet, stats, cfg.decompose, cfg.alloc)
            write_json(plan_path, plan)
            manifest.record("plan", plan_key, [plan_path], 0.0)

    # Stage D–F: decompositions → slim UNet folder.
    slim_key = stage_key("slim", plan_key)
    slim_dir = out_dir / "slim_unet"
    cached = manifest.cached("slim", slim_key)
    with _Stage(records, "decompose", cached, device):
        if not cached:
            from slimexport.decompose.api import slim_unet
            from slimexport.slim.apply import save_slim_unet

            slim, diag = slim_unet(unet, stats, plan, cfg.decompose, device=device, progress=progress)
            for name, err in diag["rel_error"].items():
                plan["modules"][name]["rel_error"] = err
            plan["cholesky_fallbacks"] = diag["cholesky_fallbacks"]
            from slimexport.models.macs import count_macs

            lh, lw = bundle.latent_size(cfg.calib.height, cfg.calib.width)
            plan["macs"] = {"latent": [lh, lw], "batch": 1, "dense": count_macs(unet, 1, lh, lw)["total"],
                            "slim": count_macs(slim, 1, lh, lw)["total"]}
            write_json(plan_path, plan)
            manifest.record("plan", plan_key, [plan_path], 0.0)
            save_slim_unet(move(slim, "cpu"), slim_dir, plan={"model": cfg.model, "fingerprint": bundle.identity(),
                                                         "budget": cfg.alloc.budget, "plan_sha256": sha256_json(plan),
                                                         "params": plan["params"], "ranks": plan["ranks"]})
            manifest.record("slim", slim_key, [slim_dir], 0.0)
            del slim
    move(bundle.unet, "cpu")
    manifest.set("params", plan["params"])
    manifest.save()
    return CompressResult(out_dir=out_dir, slim_dir=slim_dir, stats_dir=stats_dir, plan=plan, stages=records, bundle=bundle)
