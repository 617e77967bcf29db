"""The pipeline, one call per stage: ``compress`` (calibrate → allocate → decompose: a slim UNet folder) and ``build``
(compress → export → engine → verify → bench: a checked, timed build folder). Each stage runs or is reused
through :func:`slimexport.stages.run_stage`, keyed by a content hash of its inputs."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch

from slimexport.allocate.api import plan_ranks, reuses_curves
from slimexport.artifacts import (
    ensure_dir,
    read_json,
    remove_stale_temporaries,
    sha256_json,
    write_json,
    write_result,
)
from slimexport.bench.run import run_bench
from slimexport.cache import Manifest, stage_key
from slimexport.calibrate import CalibStats, calibrate, select_prompts
from slimexport.calibrate.api import check_steps
from slimexport.calibrate.prompts import read_prompts_file
from slimexport.calibrate.stats import STATS_FORMAT
from slimexport.config import BuildConfig, CompressConfig
from slimexport.decompose.api import Factorisations, slim_unet
from slimexport.devices import resolve_device, resolve_dtype
from slimexport.distributed import broadcast, dist_backend, dist_info
from slimexport.engines.onnx_export import build_export_args, export_for_build, read_export
from slimexport.engines.pipeline_folder import (
    PIPELINE_FORMAT,
    is_pipeline_source,
    pipeline_components,
    read_pipeline_folder,
    write_pipeline_folder,
)
from slimexport.engines.select import (
    check_backend_available,
    check_engine_dtype,
    engine_config,
    engine_key,
    engine_profile,
    make_engines,
    resolve_engine_device,
)
from slimexport.errors import SettingError, UsageError
from slimexport.figures import FIGURES_DIR, FIGURES_FORMAT, make_figures
from slimexport.flags import apply_flags
from slimexport.folder import (
    BuildResult,
    CompressResult,
    bench_folder,
    finish_manifest,
    relative_paths,
    verify_folder,
)
from slimexport.models import load as model_load
from slimexport.models.bundle import move
from slimexport.models.macs import count_macs
from slimexport.outdir import check_out_dir, default_out, shared_cache
from slimexport.plan import RankPlan
from slimexport.report import make_report, write_report
from slimexport.slim.apply import save_slim_unet
from slimexport.stages import StageRecord, calibration_cached, result_key, run_stage, share_calibration, timed
from slimexport.stepcache.build import cache_stages, check_cache_settings
from slimexport.verify.run import run_verify

__all__ = ["BuildResult", "CompressResult", "bench_folder", "build", "compress", "verify_folder"]

log = logging.getLogger("slimexport")



def compress(cfg: CompressConfig | None = None, out: str | Path | None = None, bundle=None, progress: bool = True,
             cache_dir: str | Path | None = None, latency=None, **flags) -> CompressResult | None:
    """SlimDiff on one model: SlimSet → calibration → scores → rank plan → decompositions → slim UNet folder.

    Args:
        cfg: the whole compressor config (default ``CompressConfig()``).
        flags: settings by the CLI's flag names, applied on top of ``cfg`` (``slimexport.flags``):
            ``compress(model="sd14", budget=0.6, allocation="greedy", calib_prompts=64)``.
        out: output folder (default ``engines/<model>-b<budget>``); holds ``calib/``, ``plan.json``,
            ``slim_unet/`` and ``manifest.json``.
        bundle: an already loaded model (else ``load_model(cfg.model, cfg.random_weights)``).
        cache_dir: where calibration statistics are shared between output folders (default ``engines/.cache``),
            so a new budget reuses them.
        latency: a :class:`~slimexport.latency.LatencyTable` of the engine the slim UNet is for: needed by
            ``--budget-metric latency`` (``build`` measures it), and with any metric the plan records its prediction.

    Returns:
        :class:`CompressResult` (``None`` on ranks other than 0 under ``torch.distributed``).
    """
    cfg = apply_flags(cfg if cfg is not None else CompressConfig(), flags)
    if cfg.alloc.metric == "latency" and latency is None:
        raise UsageError("--budget-metric latency needs the engine's latency table, which compress has no engine to "
                         "measure", "use slimexport build --budget-metric latency (it measures the table on --backend), "
                         "or pass latency= a slimexport.latency.measure_table(...) result")
    out_dir = Path(out) if out is not None else default_out(cfg.model, cfg.alloc.budget)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.calib_dtype, device)
    check_out_dir(out_dir)
    # The prompts file is checked before anything slow, and its content (not only its path) keys the calibration.
    prompts_key = [sha256_json(read_prompts_file(cfg.calib.prompts_file))] if cfg.calib.prompts_file else []
    records: dict[str, StageRecord] = {}
    rank, world = dist_info()
    if world > 1 and device.type == "cpu" and dist_backend() == "nccl":
        raise SettingError("under torchrun on GPUs the statistics are all-reduced with NCCL, which needs them on the GPU",
                           "drop CompressConfig.device='cpu' (each rank calibrates on its own GPU)")
    if bundle is None:
        with timed(records, "load", False):
            bundle = model_load.load_model(cfg.model, random_weights=cfg.random_weights, config_of=cfg.config_of)
    calib_key = stage_key("calibrate", STATS_FORMAT, bundle.identity(), cfg.calib.to_dict(), str(dtype), device.type, *prompts_key)
    manifest = _open_manifest(out_dir, cfg, bundle) if rank == 0 else None
    stats = _calibrate(cfg, bundle, manifest, records, calib_key, out_dir / "calib", shared_cache(cache_dir), device, dtype,
                       progress)
    if rank != 0:
        return None
    # The bundle's UNet is borrowed (fp32, on the device) and given back as it was.
    p0 = next(bundle.unet.parameters())
    home = (p0.device, p0.dtype)
    unet = move(bundle.unet, device, torch.float32)
    try:
        plan = _plan_and_slim(cfg, bundle, unet, stats, manifest, records, calib_key, out_dir, device, latency, progress)
    finally:
        move(bundle.unet, *home)
    manifest.set("params", plan["params"])
    manifest.save()
    return CompressResult(out_dir=out_dir, slim_dir=out_dir / "slim_unet", stats_dir=out_dir / "calib", plan=plan,
                          stages=records, bundle=bundle)


def _calibrate(cfg: CompressConfig, bundle, manifest, records: dict, calib_key: str, stats_dir: Path, cache_root: Path,
               device, dtype, progress: bool) -> CalibStats | None:
    """Stage ``calibrate``: SlimSet prompts, then the statistics of the model's own denoising loop (reused from this
    folder or the shared cache, and shared from there). Under ``torch.distributed`` every rank calibrates a shard;
    rank 0 alone writes and gets the statistics (the others ``None``)."""
    rank, _ = dist_info()
    shared = cache_root / "calib" / calib_key[:32]
    cached = calibration_cached(manifest, calib_key, stats_dir, shared) if rank == 0 else False

    def calibrated():
        check_steps(bundle, cfg.calib.num_steps)  # before the prompt selection's minute of embedding
        prompts = select_prompts(bundle, cfg.calib, device=device, cache_dir=cache_root / "embed")  # pool embeddings kept
        stats = calibrate(bundle, prompts, cfg.calib, device=device, dtype=dtype, progress=progress)
        if rank == 0:
            stats.save(stats_dir)
        return stats

    stats = run_stage(manifest, records, "calibrate", calib_key, [stats_dir], calibrated, device=device,
                      load=lambda: CalibStats.load(stats_dir) if rank == 0 else None, cached=broadcast(cached))
    if rank == 0 and not records["calibrate"].cached:
        share_calibration(stats_dir, shared)
    return stats if rank == 0 else None


def _plan_and_slim(cfg: CompressConfig, bundle, unet, stats: CalibStats, manifest, records: dict, calib_key: str,
                   out_dir: Path, device, latency, progress: bool) -> RankPlan:
    """Stages ``allocate`` (the rank plan, ``plan.json``) and ``decompose`` (the slim UNet, ``slim_unet/``; the plan
    completed with each module's error and the MACs)."""
    plan_path, slim_dir = out_dir / "plan.json", out_dir / "slim_unet"
    latent_hw = bundle.latent_size(cfg.calib.height, cfg.calib.width)
    plan_key = stage_key("plan", calib_key, cfg.decompose.to_dict(), cfg.alloc.to_dict(),
                         *([sha256_json(latency.to_dict())] if latency is not None else []))
    # the greedy allocation's factorisations, for decomposing (when the decomposition is the one its curves describe)
    factors = Factorisations() if cfg.alloc.method == "greedy" and reuses_curves(cfg.decompose) else None

    def allocated():
        plan = plan_ranks(unet, stats, cfg.decompose, cfg.alloc, latent_hw=latent_hw, factors=factors, latency=latency)
        write_json(plan_path, plan.to_dict())
        return plan

    def decomposed():
        slim, diag = slim_unet(unet, stats, plan, cfg.decompose, device=device, progress=progress,
                               factors=None if records["allocate"].cached else factors)
        if diag.get("factorisations_reused"):
            log.info("decompose: %d factorisations taken from the allocation", diag["factorisations_reused"])
        done = _finish_plan(plan, diag, unet, slim, latent_hw)
        write_json(plan_path, done.to_dict())
        manifest.record("plan", plan_key, [plan_path], 0.0)  # the plan as decomposed
        save_slim_unet(move(slim, "cpu"), slim_dir, plan={"model": cfg.model, "fingerprint": bundle.identity(),
                                                     "budget": cfg.alloc.budget, "plan_sha256": sha256_json(done.to_dict()),
                                                     "params": done["params"], "ranks": done["ranks"]})
        return done

    plan = run_stage(manifest, records, "allocate", plan_key, [plan_path], allocated, stage="plan", device=device,
                     load=lambda: RankPlan.from_dict(read_json(plan_path, "rank plan")))
    # A recomputed plan lacks what decomposing adds to it (errors, MACs): decompose again rather than keep a stale plan.
    return run_stage(manifest, records, "decompose", stage_key("slim", plan_key), [slim_dir], decomposed, stage="slim",
                     load=lambda: plan, device=device, cached=None if records["allocate"].cached else False)


def _open_manifest(out_dir: Path, cfg: CompressConfig, bundle) -> Manifest:
    """The output folder's manifest (refused if it holds another model's build), cleared of interrupted temporaries."""
    ensure_dir(out_dir)
    manifest = Manifest(out_dir, identity={"model": cfg.model, "weights": bundle.identity()})
    for stale in remove_stale_temporaries(out_dir):
        log.info("removed %s, left by an interrupted run", stale)
    manifest.set("model", {"name": cfg.model, "source": bundle.source, "fingerprint": bundle.identity()})
    manifest.set("config", cfg.to_dict())
    return manifest


def _finish_plan(plan: RankPlan, diag: dict, unet, slim, latent_hw: tuple[int, int]) -> RankPlan:
    """The rank plan with what decomposing adds: each module's relative error, the Cholesky fallbacks and the dense
    and slim MACs at the calibration's latent size."""
    lh, lw = latent_hw
    macs = {"latent": [lh, lw], "batch": 1, "dense": count_macs(unet, 1, lh, lw)["total"],
            "slim": count_macs(slim, 1, lh, lw)["total"]}
    return plan.decomposed(diag["rel_error"], diag["cholesky_fallbacks"], macs)


def build(cfg: BuildConfig | None = None, out: str | Path | None = None, progress: bool = True,
          cache_dir: str | Path | None = None, speedup: float | None = None, **flags) -> BuildResult | None:
    """The whole pipeline in one call; every stage cached by a content hash of its inputs.

    ``cfg`` (default ``BuildConfig()``) with ``flags`` applied: settings by the CLI's flag names
    (``build(model="digits", budget=0.73, calib_prompts=64, cache="auto")``; ``slimexport.flags``).
    ``speedup``: build at the largest budget whose measured speed-up reaches it (:mod:`slimexport.search`;
    ``--speedup``), raising ``TargetNotReachedError`` when no budget does.

    Writes ``manifest.json``, ``report.json`` and ``report.md`` into the output folder and returns the report.
    A failed parity gate does not raise here: ``BuildResult.passed`` is ``False`` and the report says which
    comparison and metric failed (the CLI turns that into exit code 1).
    """
    cfg = apply_flags(cfg if cfg is not None else BuildConfig(), flags)
    if speedup is not None:
        from slimexport.search import check_target, speedup_search

        tag = f"s{check_target(speedup):g}"
        out = Path(out) if out is not None else default_out(cfg.compress.model, 0, f"-{cfg.backend}", tag=tag)
        return speedup_search(cfg, speedup, out, build, progress=progress, cache_dir=cache_dir)
    check_backend_available(cfg.backend)
    device = resolve_engine_device(cfg)
    check_engine_dtype(cfg, device)
    out_dir = Path(out) if out is not None else default_out(cfg.compress.model, cfg.compress.alloc.budget, f"-{cfg.backend}")
    check_out_dir(out_dir)
    records: dict[str, StageRecord] = {}
    with timed(records, "load", False):
        bundle = model_load.load_model(cfg.compress.model, random_weights=cfg.compress.random_weights,
                                        config_of=cfg.compress.config_of)
    profile = engine_profile(cfg, bundle)  # checked before the long stages: a bad --height fails in seconds
    check_cache_settings(cfg, bundle.unet)
    pipeline = cfg.pipeline if cfg.pipeline is not None else is_pipeline_source(bundle)
    if pipeline:
        pipeline_components(bundle)  # a model without a text encoder or VAE is refused before the long stages
    latency = None
    if cfg.compress.alloc.metric == "latency":  # engine time per module and rank, measured (or cached) first
        from slimexport.latency.measure import build_table

        with timed(records, "latency", False):
            latency = build_table(cfg, bundle.unet, profile, device=device, cache_dir=shared_cache(cache_dir) / "latency",
                                  progress=progress)
    res = compress(cfg.compress, out=out_dir, bundle=bundle, progress=progress, cache_dir=cache_dir, latency=latency)
    if res is None:
        return None
    records.update(res.stages)
    manifest = Manifest(out_dir)
    models = {"dense": move(bundle.unet, "cpu", torch.float32).eval(), "slim": res.load_slim()}
    seq_len = int(bundle.encoder.encode([""])[0].shape[1])  # text tokens: 77 for CLIP, 6 for digits
    keys, exports = _export(cfg, bundle, models, manifest, records, out_dir, profile, seq_len, pipeline)
    ekey = engine_key(keys["dense"], keys["slim"], cfg, device)
    make = partial(make_engines, cfg, exports, models, device, profile, out_dir)  # built, or loaded from their files
    engines = run_stage(manifest, records, "engine", ekey, lambda e: [f for x in e.values() for f in x.files], make,
                        load=make, rerecord=True, device=torch.device(device), extra=lambda e: {
                            "backend": cfg.backend, "device": device,
                            "engine_info": relative_paths({k: x.info() for k, x in e.items()}, out_dir)})
    # Results are reused only when every artifact they were measured on was reused in this run: a file rebuilt here
    # (say, an export that `slimexport verify` found altered) is checked and timed afresh, under the same keys.
    rebuilt = any(not r.cached for k, r in records.items() if k != "load")
    again = False if rebuilt else None
    parity, speed = _verify_and_bench(cfg, bundle, models, engines, manifest, records, ekey, out_dir, profile, device, again)
    cache = None
    if cfg.cache.enabled:  # step caching: a full/shallow pair per UNet, schedule.json, then their checks and speed
        cache = cache_stages(manifest, records, cfg, bundle, models, out_dir, {**keys, "calibrate": manifest.stage("calibrate")["key"]},
                             ekey, res.stats_dir, profile, engine_config(cfg, device, profile, seq_len),
                             build_export_args(cfg, models["dense"], profile, seq_len), rebuilt)
    figs = _figures(cfg, bundle, models, manifest, records, ekey, res.plan, parity, speed, out_dir, profile, again) \
        if cfg.figures else None
    stages = {k: {"seconds": v.seconds, "cached": v.cached} for k, v in records.items()}
    report = make_report(cfg.compress.model, res.plan, parity, speed, stages,
                         extra={"backend": cfg.backend, "engine_device": device, "profile": profile.to_dict(), "figures": figs,
                                **({"stepcache": cache} if cache else {})})
    if cache:
        report["passed"] = report["passed"] and cache["check"]["passed"]
    finish_manifest(manifest, out_dir, cfg, res.plan, profile, exports, device, report)
    write_report(out_dir, report)
    return BuildResult(out_dir=out_dir, report=report, passed=report["passed"])


def _export(cfg: BuildConfig, bundle, models: dict, manifest, records: dict, out_dir: Path, profile, seq_len: int,
            pipeline: bool) -> tuple[dict, dict]:
    """Stages ``export_dense`` and ``export_slim`` (``onnx/<kind>/``), and ``pipeline`` (the whole pipeline as ONNX
    with the slim UNet, for diffusers' and Optimum's ONNX pipelines) when asked for; the export keys and results."""
    upstream = {"dense": bundle.identity(), "slim": manifest.stage("slim")["key"]}
    keys, exports = {}, {}
    for kind in ("dense", "slim"):
        keys[kind] = stage_key("export", kind, upstream[kind], cfg.export.to_dict(), profile.to_dict())
        folder = out_dir / "onnx" / kind
        run_stage(manifest, records, f"export_{kind}", keys[kind], [folder],
                  partial(export_for_build, cfg, models[kind], folder, profile, seq_len))
        exports[kind] = read_export(folder)
    if pipeline:
        pipe_dir = out_dir / "pipeline"
        pipe = run_stage(manifest, records, "pipeline", stage_key("pipeline", PIPELINE_FORMAT, keys["slim"], upstream["dense"]),
                         [pipe_dir], lambda: write_pipeline_folder(bundle, out_dir / "onnx" / "slim", pipe_dir),
                         load=lambda: read_pipeline_folder(pipe_dir))
        manifest.set("pipeline", {"path": "pipeline", **pipe.to_dict()})
    return keys, exports


def _verify_and_bench(cfg: BuildConfig, bundle, models: dict, engines: dict, manifest, records: dict, ekey: str,
                      out_dir: Path, profile, device: str, cached: bool | None) -> tuple[dict, dict]:
    """Stages ``verify`` (parity and fidelity, ``verify.json``) and ``bench`` (dense vs slim engine speed,
    ``bench.json``); the engines are closed after them."""
    try:
        parity = run_stage(manifest, records, "verify", result_key("verify", ekey, cfg), [out_dir / "verify.json"],
                           lambda: write_result(out_dir / "verify.json", run_verify(cfg, bundle, models, engines, profile)),
                           load=lambda: read_json(out_dir / "verify.json", "verification results"), cached=cached)
        speed = run_stage(manifest, records, "bench", result_key("bench", ekey, cfg), [out_dir / "bench.json"],
                          lambda: write_result(out_dir / "bench.json", relative_paths(run_bench(cfg, engines, profile), out_dir)),
                          load=lambda: read_json(out_dir / "bench.json", "benchmark results"), cached=cached,
                          device=torch.device(device))
    finally:
        for e in engines.values():
            e.close()
    return parity, speed


def _figures(cfg: BuildConfig, bundle, models: dict, manifest, records: dict, ekey: str, plan: RankPlan, parity: dict,
             speed: dict, out_dir: Path, profile, cached: bool | None) -> dict:
    """Stage ``figures``: the report's figures (``figures/index.json`` names them), from the checks and timings."""
    fig_dir = out_dir / FIGURES_DIR
    key = stage_key("figures", FIGURES_FORMAT, result_key("verify", ekey, cfg), result_key("bench", ekey, cfg))
    return run_stage(manifest, records, "figures", key, [fig_dir], lambda: write_result(fig_dir / "index.json", make_figures(
        out_dir, plan, parity, speed, bundle, models["dense"], models["slim"], cfg.verify, (profile.opt_height, profile.opt_width))),
                     load=lambda: read_json(fig_dir / "index.json", "figure index"), cached=cached)
