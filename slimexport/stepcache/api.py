"""The step-cache stage of a build: measure, plan, write ``schedule.json``, export each UNet's full/shallow pair.

Build folder additions (:func:`cache_stage`)::

    schedule.json                 every UNet's plan and its schedules for CacheConfig.steps (versioned)
    stepcache/change-<name>.json  (auto) the measured per-step, per-depth feature change of UNet <name>
    onnx/<name>-cache/            full/ and shallow/ ONNX graphs + pair.json (slimexport.stepcache.export)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch.nn as nn

from slimexport.artifacts import sha256_file
from slimexport.config import CalibConfig
from slimexport.errors import UsageError
from slimexport.stepcache.export import export_cache_pair
from slimexport.stepcache.measure import measure_change
from slimexport.stepcache.schedule import SCHEDULE_FILE, CacheConfig, CachePlan, write_schedules
from slimexport.stepcache.unet import check_depth

log = logging.getLogger(__name__)

PROFILE_DIR = "stepcache"


def pair_dir(out_dir: str | Path, name: str) -> Path:
    """Where UNet ``name``'s full/shallow pair goes in a build folder."""
    return Path(out_dir) / "onnx" / f"{name}-cache"


def plan_cache(bundle, unet: nn.Module, cfg: CacheConfig, *, prompts: list[str] | None = None,
               calib: CalibConfig | None = None, device: str = "cpu", name: str = "unet") -> CachePlan:
    """The plan of one UNet: for ``auto`` its feature change measured over the first ``cfg.measure_prompts``
    calibration ``prompts`` with the ``calib`` sampler (every depth; the ε error at ``cfg.depth``)."""
    check_depth(unet, cfg.depth)
    if cfg.mode != "auto":
        return CachePlan(cfg, meta={"unet": name})
    if calib is None:
        raise UsageError("--cache auto measures the feature change with the calibration sampler, and got no CalibConfig",
                         "pass calib= (the build's CalibConfig), or use --cache N")
    if prompts is None:
        from slimexport.calibrate.api import select_prompts

        prompts = select_prompts(bundle, calib.replace(num_prompts=cfg.measure_prompts))
    profile = measure_change(bundle, list(prompts)[: cfg.measure_prompts], calib, unet=unet,
                             eps_error=(cfg.depth,) if cfg.eps_error else False, device=device)
    return CachePlan(cfg, profile, meta={"unet": name})


def cache_stage(bundle, unets: dict[str, nn.Module], out_dir: str | Path, cfg: CacheConfig, *,
                prompts: list[str] | None = None, calib: CalibConfig | None = None, export: bool = True,
                dtype: str = "fp32", opset: int = 19, output_name: str = "latent",
                sample_shape: tuple[int, int, int, int] | None = None, context_shape: tuple[int, int, int] | None = None,
                timestep_dtype: str = "float32", device: str = "cpu") -> dict:
    """Step caching for every UNet of a build (dense and/or slim: it stacks with any slimming).

    Args:
        bundle: the model (scheduler, encoder, sizes).
        unets: name -> UNet, e.g. ``{"dense": bundle.unet, "slim": slim_unet}``; names become folder names.
        out_dir: the build folder.
        cfg: the cache settings; ``mode="off"`` does nothing.
        prompts, calib: the calibration prompts (SlimSet) and sampler settings, for ``auto``.
        export: export each UNet's full/shallow ONNX pair (the other arguments as ``export_unet_onnx``'s).
        device: where the measurement runs.

    Returns:
        What the manifest records: ``{"config", "describe", "schedule": {"path", "sha256"}, "unets": {name:
        {"schedules": {steps: pattern}, "profile": path or None, "change": per-depth summary, "pair": {"path",
        "depth", "cache_channels", "cache_scale", "full"/"shallow": {"onnx_sha256", "data_sha256", "size_bytes",
        "export_seconds"}}}}, "seconds"}``; paths relative to ``out_dir``. ``{"config", "describe"}`` only when off.

    Raises:
        UsageError: a depth beyond a UNet's blocks (before any work), ``auto`` without ``calib``.
    """
    record: dict = {"config": cfg.to_dict(), "describe": cfg.describe()}
    if not cfg.enabled:
        return record
    for name, unet in unets.items():
        try:
            check_depth(unet, cfg.depth)
        except UsageError as err:
            raise UsageError(f"UNet {name!r}: {err.message}", err.fix) from None
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    plans: dict[str, CachePlan] = {}
    record["unets"] = {}
    for name, unet in unets.items():
        plan = plan_cache(bundle, unet, cfg, prompts=prompts, calib=calib, device=device, name=name)
        plans[name] = plan
        entry: dict = {"profile": None, "change": None}
        if plan.profile is not None:
            rel = Path(PROFILE_DIR) / f"change-{name}.json"
            plan.profile.save(out_dir / rel)
            entry.update(profile=str(rel), change=plan.profile.summary())
        entry["schedules"] = {str(n): plan.schedule_for_steps(n, bundle.make_scheduler).pattern() for n in cfg.steps}
        if export:
            folder = pair_dir(out_dir, name)
            pair = export_cache_pair(unet, folder, cfg.depth, opset=opset, dtype=dtype, output_name=output_name,
                                     sample_shape=sample_shape, context_shape=context_shape, timestep_dtype=timestep_dtype)
            entry["pair"] = {"path": str(folder.relative_to(out_dir)), "depth": pair["depth"],
                             "cache_channels": pair["cache_channels"], "cache_scale": pair["cache_scale"],
                             **{k: {f: pair[k][f] for f in ("onnx_sha256", "data_sha256", "size_bytes", "export_seconds")}
                                for k in ("full", "shallow")}}
        record["unets"][name] = entry
    path = write_schedules(out_dir / SCHEDULE_FILE, plans, bundle.make_scheduler)
    record["schedule"] = {"path": SCHEDULE_FILE, "sha256": sha256_file(path)}
    record["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("step caching (%s) for %s in %.1f s", cfg.describe(), ", ".join(unets), record["seconds"])
    return record
