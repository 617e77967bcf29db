"""Build folders after the build: ``verify DIR`` checks every artifact and reruns the parity comparisons, ``bench
DIR`` times the engines again; both keep the folder's report and the manifest's results current.

A folder is checked as built: altered files are reported, never rebuilt here, and TensorRT plans or AOTInductor
packages are loaded as compiled (one made for another GPU, device or torch version is refused, not recompiled).
What the pipeline returns is defined here too: ``CompressResult`` (``compress``) and ``BuildResult``.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimexport.artifacts import json_object, read_json, sha256_json, write_json
from slimexport.bench.run import run_bench
from slimexport.cache import Manifest
from slimexport.config import BuildConfig
from slimexport.engines.onnx_export import read_export
from slimexport.engines.select import (
    COMPILED_SUFFIX,
    MODEL_BACKENDS,
    check_engine_dtype,
    engine_profile,
    make_engines,
    resolve_engine_device,
    same_machine,
)
from slimexport.errors import (
    ArtifactError,
    IncompatibleArtifactError,
    ModelNotFoundError,
    SlimExportError,
    UsageError,
)
from slimexport.figures import FIGURES_DIR, latency_figure
from slimexport.models import load as model_load
from slimexport.models.bundle import move
from slimexport.plan import RankPlan
from slimexport.report import make_report, write_report
from slimexport.slim.apply import load_slim_unet
from slimexport.stages import StageRecord, result_key
from slimexport.verify.run import run_verify

# Stages whose records (and files) every finished build has: a manifest without them vouches for nothing.
RECORDED_STAGES = ("slim", "export_dense", "export_slim", "engine")


@dataclass
class BuildResult:
    """What ``build``, ``verify_folder`` and ``bench_folder`` return: the folder, the report (as in ``report.json``)
    and the verdict."""

    out_dir: Path
    report: dict
    passed: bool


@dataclass
class CompressResult:
    """What ``compress`` returns.

    Attributes:
        out_dir: the output folder; ``slim_dir``: the slim UNet folder inside it (``load_slim_unet(slim_dir)``).
        plan: the rank plan (ranks, per-module diagnostics, parameter counts; ``plan.json``).
        stages: per stage, wall seconds and whether it was a cache hit.
    """

    out_dir: Path
    slim_dir: Path
    stats_dir: Path
    plan: RankPlan
    stages: dict[str, StageRecord] = field(default_factory=dict)
    bundle: object = None

    def load_slim(self, device="cpu", dtype=torch.float32):
        return load_slim_unet(self.slim_dir, device=device, dtype=dtype)


def relative_paths(obj, root: Path):
    """``obj`` with every absolute path string inside ``root`` made relative to it (manifests and reports hold no
    absolute paths into the folder, so a moved or copied folder stays valid)."""
    if isinstance(obj, dict):
        return {k: relative_paths(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relative_paths(v, root) for v in obj]
    if isinstance(obj, str) and os.path.isabs(obj):
        try:
            return Path(obj).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            return obj
    return obj


def results_summary(report: dict) -> dict:
    """The manifest's summary of a report: the verdict, each comparison's, the speed-up (kept current by verify and bench)."""
    return {"passed": bool(report.get("passed")), "parity": {k: bool(v.get("passed")) for k, v in report.get("parity", {}).items()},
            "speedup": (report.get("speed") or {}).get("speedup")}


def _load_build(folder: str | Path):
    """Read a build folder's manifest and config, reload its model, and check the model is the same one."""
    folder = Path(folder)
    if not (folder / "manifest.json").exists():
        raise UsageError(f"{folder} is not a build folder (no manifest.json)", "pass a folder written by slimexport build")
    if not isinstance(read_json(folder / "manifest.json", "manifest"), dict):  # reported as corrupted (Manifest() starts afresh)
        raise ArtifactError(f"{folder / 'manifest.json'} is not a JSON object: the folder is damaged",
                            "rebuild it with slimexport build")
    manifest = Manifest(folder)
    if "build_config" not in manifest.data:
        raise UsageError(f"{folder} holds no finished build (its manifest has no build config)", "run slimexport build first")
    cfg = BuildConfig.from_dict(manifest.data["build_config"])
    try:
        bundle = model_load.load_model(cfg.compress.model, random_weights=cfg.compress.random_weights,
                                        config_of=cfg.compress.config_of)
    except ModelNotFoundError:  # a relative path given to the Python API, read from another folder: the recorded one
        source = str(manifest.data.get("model", {}).get("source", ""))
        if not (source.startswith("local:") and Path(source[6:]).exists()):
            raise
        bundle = model_load.load_model(source[6:], random_weights=cfg.compress.random_weights, config_of=cfg.compress.config_of)
    want = manifest.data.get("model", {}).get("fingerprint")
    if want is not None and bundle.identity() != want:
        raise IncompatibleArtifactError(
            f"model '{cfg.compress.model}' is not the one {folder} was built from (weights fingerprint "
            f"{bundle.identity()[:19]}… here, {want[:19]}… there)", "rebuild the folder with slimexport build",
        )
    return folder, manifest, cfg, bundle


def _compiled_engines(manifest: Manifest, folder: Path, backend: str) -> dict[str, Path] | None:
    """The plan or package per kind that the build recorded (``None`` for backends that compile nothing to disk)."""
    suffix = COMPILED_SUFFIX.get(backend)
    if suffix is None:
        return None
    files = manifest.stage("engine").get("files", {})
    out = {}
    for kind in ("dense", "slim"):
        found = [rel for rel in files if rel.endswith(suffix) and Path(rel).parent.name == kind]
        if len(found) != 1:
            raise ArtifactError(f"{folder}'s manifest records {len(found)} {backend} engine files for the {kind} UNet, "
                                "not one", "rebuild the folder with slimexport build")
        out[kind] = folder / found[0]
    return out


def _integrity(manifest: Manifest) -> dict:
    problems = [f"{stage}: no record in the manifest" for stage in RECORDED_STAGES if not manifest.stage(stage)]
    problems += [f"{p}: {why}" for stage in manifest.data["stages"] for p, why in manifest.altered(stage)]
    return {"passed": not problems, "problems": problems, "reason": "; ".join(problems) or None}


def verify_folder(folder: str | Path) -> BuildResult:
    """``slimexport verify DIR``: check every artifact's sha256, then rerun the three comparisons.

    Altered files are reported (``integrity``), never rebuilt here; the comparisons still run on what is on disk,
    so a corrupted slim weight shows up as the failing comparison too. TensorRT plans and AOTInductor packages run
    as built: one compiled for another GPU, device or torch version is refused, not recompiled into the folder.
    """
    folder, manifest, cfg, bundle = _load_build(folder)
    integrity = _integrity(manifest)
    profile = engine_profile(cfg, bundle)
    device = resolve_engine_device(cfg)
    check_engine_dtype(cfg, device, folder)
    try:
        models = {"dense": move(bundle.unet, "cpu", torch.float32).eval(), "slim": load_slim_unet(folder / "slim_unet", check=False)}
        exports = {k: read_export(folder / "onnx" / k) for k in ("dense", "slim")}
        compiled = _compiled_engines(manifest, folder, cfg.backend)
        engines = make_engines(cfg, exports, models, device, profile, folder, compiled)
    except SlimExportError as err:
        if isinstance(err, IncompatibleArtifactError) and integrity["passed"]:
            raise  # an intact folder checked on the wrong machine: nothing about the folder to record
        if not isinstance(err, ArtifactError) and not integrity["problems"]:
            raise
        # an artifact too damaged to load: the folder fails, naming the files the manifest no longer matches
        message = f"{err.message} (altered files: {integrity['reason']})" if integrity["problems"] else err.message
        _write_verdict(folder, manifest, cfg, None, {**integrity, "passed": False, "reason": message}, 0.0, record=False)
        if isinstance(err, ArtifactError):
            raise type(err)(message, err.fix) from err  # same exit code
        raise ArtifactError(message, "rebuild the folder with slimexport build") from err
    t0 = time.perf_counter()
    try:
        parity = run_verify(cfg, bundle, models, engines, profile)
    finally:
        for e in engines.values():
            e.close()
    report = _write_verdict(folder, manifest, cfg, parity, integrity, time.perf_counter() - t0,
                            record=same_machine(manifest, cfg, device))
    return BuildResult(out_dir=folder, report=report, passed=report["passed"])


def _write_verdict(folder: Path, manifest: Manifest, cfg, parity: dict | None, integrity: dict, seconds: float,
                   record: bool) -> dict:
    """verify's outcome into report.json/.md and the manifest's results (``parity`` None: the check could not run).

    verify.json holds what build's verify stage holds, under the same key, so a rerun or a later build trusts it: it
    is written only for an intact folder checked on the build's machine (``record``). A verdict on altered files drops
    the stage (a later build that rebuilds them checks afresh); one from another machine leaves the build's alone.
    """
    if parity is not None and integrity["passed"] and record:
        write_json(folder / "verify.json", parity)
        manifest.record("verify", result_key("verify", manifest.stage("engine").get("key"), cfg), [folder / "verify.json"], seconds)
    elif not integrity["passed"]:
        manifest.invalidate("verify")
    report = json_object(folder / "report.json", "report") or {}
    if not report.get("params"):  # report.json deleted or damaged: made again from the plan and the last bench
        report = _remade_report(folder, manifest, cfg) or report
    report["parity"] = {**(parity or {}), "integrity": integrity}  # integrity: of this check only, not in verify.json
    report["passed"] = all(v.get("passed", False) for v in report["parity"].values())
    if report.get("params"):
        write_report(folder, report)
    else:  # stale (they may say PASSED) and cannot be written again without the plan
        for name in ("report.md", "report.html"):
            (folder / name).unlink(missing_ok=True)
    manifest.set("results", results_summary(report))
    manifest.save()
    return report


def _remade_report(folder: Path, manifest: Manifest, cfg) -> dict | None:
    """A build's report from its plan.json, bench.json and manifest (``None`` when the plan is unusable)."""
    try:
        plan = read_json(folder / "plan.json", "rank plan")
        speed = read_json(folder / "bench.json", "benchmark results") if (folder / "bench.json").exists() else None
        stages = {k: {"seconds": v.get("seconds", 0.0), "cached": True} for k, v in manifest.data["stages"].items()}
        return make_report(cfg.compress.model, plan, {}, speed if isinstance(speed, dict) else None, stages,
                           extra={"backend": cfg.backend, "engine_device": manifest.data.get("device", {}).get("engine_device"),
                                  "profile": manifest.data.get("profile")})
    except (ArtifactError, KeyError, TypeError, AttributeError):
        return None


def bench_folder(folder: str | Path, iterations: int | None = None) -> BuildResult:
    """``slimexport bench DIR``: time the folder's dense and slim engines again (same backend, same shapes, the
    compiled plans or packages as built)."""
    folder, manifest, cfg, bundle = _load_build(folder)
    report = json_object(folder / "report.json", "report") or {}
    if not report.get("params"):  # before timing: fails fast, nothing written
        raise ArtifactError(f"report {folder / 'report.json'} is missing or damaged",
                            f"run slimexport verify {folder} first (it writes the report again)")
    if iterations is not None:
        cfg = cfg.replace(bench=cfg.bench.replace(iterations=iterations))
    profile = engine_profile(cfg, bundle)
    device = resolve_engine_device(cfg)
    check_engine_dtype(cfg, device, folder)
    exports = {k: read_export(folder / "onnx" / k, verify=True) for k in ("dense", "slim")}
    compiled = _compiled_engines(manifest, folder, cfg.backend)
    models = {}
    if cfg.backend in MODEL_BACKENDS and compiled is None:
        models = {"dense": move(bundle.unet, "cpu", torch.float32).eval(), "slim": load_slim_unet(folder / "slim_unet")}
    engines = make_engines(cfg, exports, models, device, profile, folder, compiled)
    t0 = time.perf_counter()
    try:
        speed = relative_paths(run_bench(cfg, engines, profile), folder)
    finally:
        for e in engines.values():
            e.close()
    if same_machine(manifest, cfg, device):  # else the build's bench stays the build's (this run goes in the report)
        write_json(folder / "bench.json", speed)  # keyed by the settings it was measured with (--iterations included)
        manifest.record("bench", result_key("bench", manifest.stage("engine").get("key"), cfg), [folder / "bench.json"],
                        time.perf_counter() - t0)
    report["speed"] = speed
    latency = (report.get("figures") or {}).get("latency")
    if latency and manifest.stage("figures"):  # the report's latency figure shows this run, like its table
        latency_figure(speed, folder / latency)
        manifest.record("figures", manifest.stage("figures")["key"], [folder / FIGURES_DIR], 0.0)
    write_report(folder, report)
    manifest.set("results", results_summary(report))
    manifest.save()
    return BuildResult(out_dir=folder, report=report, passed=report.get("passed", False))


def finish_manifest(manifest: Manifest, out_dir: Path, cfg: BuildConfig, plan, profile, exports: dict,
                     device: str, report: dict) -> None:
    """What a finished build's manifest holds besides its stages: config, shapes, ONNX files, machine, results."""
    manifest.set("build_config", cfg.to_dict())
    manifest.set("profile", profile.to_dict())
    manifest.set("io", exports["dense"].io_spec)
    manifest.set("onnx", {k: {"model": os.path.relpath(e.onnx_path, out_dir), "sha256": e.onnx_sha256,
                              "data": os.path.relpath(e.data_path, out_dir), "data_sha256": e.data_sha256, "opset": e.opset,
                              "dtype": e.dtype, "size_bytes": e.size_bytes} for k, e in exports.items()})
    manifest.set("slim_weights", {"path": "slim_unet/diffusion_pytorch_model.safetensors",
                                  "plan_sha256": sha256_json(plan["ranks"])})
    manifest.set("versions", versions())
    gpu = torch.device(device) if device.startswith("cuda") else None
    manifest.set("device", {"engine_device": device, **({"gpu": torch.cuda.get_device_name(gpu),
                            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(gpu)))} if gpu else {})})
    manifest.set("results", results_summary(report))
    manifest.set("built_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    manifest.save()


def versions() -> dict:
    out = {}
    for pkg in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "polygraphy",
                "tensorrt", "triton"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out
