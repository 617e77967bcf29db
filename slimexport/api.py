"""The pipeline in a few readable calls: ``compress`` (stages A–F) and ``build`` (compress → export → engine →
verify → bench). Each stage is a function between artifacts, cached by a content hash of its inputs."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimexport.artifacts import read_json, sha256_json, write_json
from slimexport.cache import Manifest, share_dir, stage_key
from slimexport.config import CompressConfig
from slimexport.distributed import broadcast, dist_backend, dist_info
from slimexport.errors import ArtifactError, IncompatibleArtifactError, SlimExportError, UsageError
from slimexport.models.bundle import move

log = logging.getLogger("slimexport")
DEFAULT_ROOT = Path("engines")
# Where calibration statistics are shared between builds (a new budget reuses them): $SLIMEXPORT_CACHE_DIR, else here.
CACHE_ENV = "SLIMEXPORT_CACHE_DIR"
# What slimexport writes into an --out folder (its temporaries start with '.'): any other entry is someone else's.
OUTPUT_ENTRIES = frozenset({"manifest.json", "calib", "plan.json", "slim_unet", "onnx", "aoti", "verify.json", "bench.json",
                            "report.json", "report.md"})


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


def _json_object(path: Path, what: str) -> dict | None:
    """The JSON object in ``path``; ``None`` when it is missing, unreadable or not an object."""
    try:
        data = read_json(path, what) if path.is_file() else None
    except ArtifactError:
        return None
    return data if isinstance(data, dict) else None


def check_out_dir(out_dir: Path) -> None:
    """Refuse, before any work, an --out that cannot be written, or a folder of someone else's files (slimexport
    would write calib/, onnx/ and reports among them)."""
    from slimexport.artifacts import check_writable_dir

    check_writable_dir(out_dir)
    if out_dir.is_dir() and _json_object(out_dir / "manifest.json", "manifest") is None:
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in OUTPUT_ENTRIES and not p.name.startswith("."))
        if foreign:
            raise UsageError(f"{out_dir} holds files slimexport did not write ({', '.join(foreign[:3])}"
                             f"{', …' if len(foreign) > 3 else ''}) and no readable manifest.json", "pass a new or empty --out folder")


def default_out(model: str, budget: float, suffix: str = "") -> Path:
    """``engines/<name>-b<budget><suffix>``: a folder's name (its pipeline's for a ``unet/`` folder), else the id."""
    path = Path(model).expanduser().resolve()
    if path.exists():
        name = path.parent.name if path.name == "unet" and (path.parent / "model_index.json").exists() else path.name
    else:
        name = model.replace("/", "--")
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
    from slimexport.calibrate.prompts import read_prompts_file
    from slimexport.models.load import load_model

    out_dir = Path(out) if out is not None else default_out(cfg.model, cfg.alloc.budget)
    cache_root = Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_ROOT / ".cache")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.calib_dtype, device)
    check_out_dir(out_dir)
    # The prompts file is checked before anything slow, and its content (not only its path) keys the calibration.
    prompts_key = [sha256_json(read_prompts_file(cfg.calib.prompts_file))] if cfg.calib.prompts_file else []
    records: dict[str, StageRecord] = {}

    rank, world = dist_info()
    if world > 1 and device.type == "cpu" and dist_backend() == "nccl":
        raise UsageError("under torchrun on GPUs the statistics are all-reduced with NCCL, which needs them on the GPU",
                         "drop --device cpu (each rank calibrates on its own GPU)")
    if bundle is None:
        with _Stage(records, "load", False, torch.device("cpu")):
            bundle = load_model(cfg.model, random_weights=cfg.random_weights)
    identity = {"model": cfg.model, "weights": bundle.identity()}
    from slimexport.calibrate.stats import STATS_FORMAT

    calib_key = stage_key("calibrate", STATS_FORMAT, bundle.identity(), cfg.calib.to_dict(), str(dtype), device.type, *prompts_key)
    stats_dir = out_dir / "calib"
    manifest = None
    cached = False
    if rank == 0:
        from slimexport.artifacts import ensure_dir, remove_stale_temporaries

        ensure_dir(out_dir)
        manifest = Manifest(out_dir, identity=identity)
        for stale in remove_stale_temporaries(out_dir):
            log.info("removed %s, left by an interrupted run", stale)
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
            from slimexport.calibrate.api import check_steps

            check_steps(bundle, cfg.calib.num_steps)  # before the prompt selection's minute of embedding
            prompts = select_prompts(bundle, cfg.calib, device=device)
            stats = calibrate(bundle, prompts, cfg.calib, device=device, dtype=dtype, progress=progress)
            if rank == 0:
                stats.save(stats_dir)
                manifest.record("calibrate", calib_key, [stats_dir], stats.meta["seconds"])
                try:
                    share_dir(stats_dir, cache_root / "calib" / calib_key[:32])
                except (OSError, SlimExportError) as err:  # the shared cache is optional: a full or read-only disk there is not fatal
                    log.warning("could not share calibration statistics in %s (%s)", cache_root, err)
    if rank != 0:
        return None

    # Stage C–E: scores and the rank plan. The bundle's UNet is borrowed (fp32, on the device) and given back as it was.
    p0 = next(bundle.unet.parameters())
    home = (p0.device, p0.dtype)
    unet = move(bundle.unet, device, torch.float32)
    try:
        plan_key = stage_key("plan", calib_key, cfg.decompose.to_dict(), cfg.alloc.to_dict())
        plan_path = out_dir / "plan.json"
        cached = plan_cached = manifest.cached("plan", plan_key)
        factors = None  # the greedy allocation's factorisations, handed to the decomposition
        with _Stage(records, "allocate", cached, device):
            if cached:
                plan = read_json(plan_path, "rank plan")
            else:
                from slimexport.allocate.api import plan_ranks
                from slimexport.decompose.api import Factorisations

                factors = Factorisations() if cfg.alloc.method == "greedy" else None
                plan = plan_ranks(unet, stats, cfg.decompose, cfg.alloc, latent_hw=bundle.latent_size(cfg.calib.height, cfg.calib.width),
                                  factors=factors)
                write_json(plan_path, plan)
                manifest.record("plan", plan_key, [plan_path], 0.0)

        # Stage D–F: decompositions → slim UNet folder.
        slim_key = stage_key("slim", plan_key)
        slim_dir = out_dir / "slim_unet"
        # A recomputed plan lacks what decomposing adds to it (errors, MACs): decompose again rather than keep a stale plan.
        cached = plan_cached and manifest.cached("slim", slim_key)
        with _Stage(records, "decompose", cached, device):
            if not cached:
                from slimexport.decompose.api import slim_unet
                from slimexport.slim.apply import save_slim_unet

                slim, diag = slim_unet(unet, stats, plan, cfg.decompose, device=device, progress=progress, factors=factors)
                if factors is not None:
                    log.info("decompose: %d factorisations taken from the allocation", diag["factorisations_reused"])
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
                del slim, factors
    finally:
        move(bundle.unet, *home)
    manifest.set("params", plan["params"])
    manifest.save()
    return CompressResult(out_dir=out_dir, slim_dir=slim_dir, stats_dir=stats_dir, plan=plan, stages=records, bundle=bundle)


# ----------------------------------------------------------------------------------------------------------
# build: compress → export → engine → verify → bench → report


@dataclass
class BuildResult:
    """What ``build`` returns: the folder, the report (as in ``report.json``) and the verdict."""

    out_dir: Path
    report: dict
    passed: bool


def _latent_multiple(unet) -> int:
    return 2 ** (len(unet.config.block_out_channels) - 1)


def engine_profile(cfg, bundle):
    """The engine profile from the build config (pixels and prompts) and the model's sizes."""
    from slimexport.engines.base import EngineProfile

    step = bundle.vae_scale_factor * _latent_multiple(bundle.unet)

    def around(size: int) -> tuple[int, int, int]:
        def snap(v: float) -> int:
            return max(step, int(round(v / step)) * step)

        return snap(size / 2), snap(size), snap(size * 1.5)

    height = cfg.height or around(bundle.image_size[0])
    width = cfg.width or around(bundle.image_size[1])
    return EngineProfile.from_pixels(batch=cfg.batch, height=height, width=width, vae_scale_factor=bundle.vae_scale_factor,
                                     cfg=True, latent_multiple=_latent_multiple(bundle.unet))


def resolve_engine_device(cfg) -> str:
    if cfg.engine_device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--engine-device {cfg.engine_device} asked for, but no CUDA GPU is visible",
                         "use --engine-device cpu (or auto)")
    if cfg.engine_device != "auto":
        return cfg.engine_device  # cuda:N kept: every backend places its engine on that GPU
    if not torch.cuda.is_available():
        return "cpu"
    if cfg.backend == "onnxruntime":
        import onnxruntime

        return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    return "cuda"


def _check_backend_available(backend: str) -> None:
    import importlib.util

    from slimexport.errors import MissingExtraError

    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        raise MissingExtraError("tensorrt", "trt", "--backend tensorrt")
    if backend == "aoti":
        from slimexport.engines.aoti import check_compiler

        check_compiler()  # before calibration: the packages are compiled C++


# Backends whose engines are made from the torch models (not from the ONNX export); fp32 on the CPU.
MODEL_BACKENDS = ("torch", "aoti", "torch-compile")


def _check_engine_dtype(cfg, device: str, folder: Path | None = None) -> None:
    """Refuse an fp16 engine the CPU would not run as fp16 (before any work); warn where fp16 is only slower.

    ``folder``: the build folder that verify or bench checks (the fix then is another machine, not other flags).
    """
    if cfg.export.dtype != "fp16" or device.startswith("cuda"):
        return
    if cfg.backend in MODEL_BACKENDS:
        raise UsageError(f"--dtype fp16 with --backend {cfg.backend} runs on a GPU only (on the CPU these engines run fp32)",
                         f"check {folder} on a GPU machine" if folder is not None
                         else "drop --dtype fp16 on the CPU, or pass --engine-device cuda on a GPU machine")
    log.warning("--dtype fp16 on the CPU: ONNX Runtime has few fp16 CPU kernels and casts around the rest, so the "
                "engines are usually slower than fp32 there (fp16 is for GPUs)")


def _engine_config(cfg, device: str, profile, seq_len: int):
    from slimexport.engines.base import EngineConfig

    cuda = device.startswith("cuda")
    eager_like = cuda and cfg.backend in ("torch", "torch-compile")
    return EngineConfig(device=device, profile=profile, dtype=cfg.export.dtype,
                        channels_last=eager_like, cuda_graphs=eager_like,
                        optimization_level=cfg.optimization_level, output_name=cfg.export.output_name, seq_len=seq_len)


def _make_engines(cfg, exports: dict, models: dict, device: str, profile, out_dir: Path | None = None,
                  compiled: dict[str, Path] | None = None):
    """The dense and slim engines of ``cfg.backend``; ``compiled`` (by kind): load these plans or packages, build nothing."""
    from slimexport.engines.base import CONTEXT, build_engine

    seq_len = next(e["shape"][1] for e in exports["dense"].io_spec["inputs"] if e["name"] == CONTEXT)  # the text tokens
    ecfg = _engine_config(cfg, device, profile, seq_len)

    def make(kind: str):
        if compiled is not None:  # checked against this machine on load (IncompatibleArtifactError), never rebuilt
            return build_engine(cfg.backend, compiled[kind], ecfg)
        if cfg.backend == "aoti":  # packages in OUT/aoti/<kind>, reused when model, profile, device and torch match
            return build_engine("aoti", models[kind], ecfg.replace(cache_dir=None if out_dir is None else str(Path(out_dir) / "aoti" / kind)))
        return build_engine(cfg.backend, models[kind] if cfg.backend in MODEL_BACKENDS else exports[kind].folder, ecfg)

    engines = {}
    try:
        for kind in ("dense", "slim"):
            engines[kind] = make(kind)
    except BaseException:
        for e in engines.values():  # the dense engine when the slim one fails: its device memory goes back
            e.close()
        raise
    return engines


def _engine_key(dense_export_key: str, slim_export_key: str, cfg, device: str) -> str:
    """Key of the ``engine`` stage: the two exports, the backend and the machine it runs on (device, torch)."""
    return stage_key("engine", dense_export_key, slim_export_key, cfg.backend, device, cfg.optimization_level, torch.__version__)


def _same_machine(manifest: Manifest, cfg, device: str) -> bool:
    """Whether ``verify DIR``/``bench DIR`` run where the build did: only then are their results the build's stages."""
    key = _engine_key(manifest.stage("export_dense").get("key"), manifest.stage("export_slim").get("key"), cfg, device)
    return key == manifest.stage("engine").get("key")


def _result_key(stage: str, engine_key: str, cfg) -> str:
    """Key of the ``verify`` or ``bench`` stage: its engines and its own settings (build and verify/bench DIR alike)."""
    return stage_key(stage, engine_key, getattr(cfg, stage).to_dict())


def run_verify(cfg, bundle, models: dict, engines: dict, profile) -> dict:
    """The three parity comparisons on fixed inputs at the profile's optimal latent size."""
    from slimexport.config import MAX_VERIFY_PROMPTS
    from slimexport.verify import parity

    hw = (profile.opt_height, profile.opt_width)
    vcfg = cfg.verify  # 2 × num_prompts rows (CFG): kept inside the engines' batch range
    n = max(1, min(max(vcfg.num_prompts, -(-profile.min_batch // 2)), profile.max_batch // 2))
    if n > MAX_VERIFY_PROMPTS:
        raise UsageError(f"the engine profile takes at least {profile.min_batch} rows, more than verify's "
                         f"{2 * MAX_VERIFY_PROMPTS} (2 × {MAX_VERIFY_PROMPTS} prompts)", "lower the --batch minimum")
    if n != vcfg.num_prompts:
        log.info("verify: %d prompt(s) instead of %d, to fit the engine profile (batch %d..%d rows, two per prompt)",
                 n, vcfg.num_prompts, profile.min_batch, profile.max_batch)
        vcfg = vcfg.replace(num_prompts=n)
    inputs = parity.fixed_inputs(bundle, vcfg, hw)
    tol = parity.export_tolerance(engines["dense"].io_spec["inputs"][0]["dtype"].replace("float", "fp"), vcfg)
    out = {}
    for kind in ("dense", "slim"):
        out[f"{kind}_export"] = parity.engine_vs_torch(engines[kind], models[kind], inputs, tol)
    out["slim_vs_dense"] = parity.slim_vs_dense(models["dense"], models["slim"], bundle, inputs, vcfg, hw)
    return out


def run_bench(cfg, engines: dict, profile) -> dict:
    from slimexport.bench.timing import compare_speed
    from slimexport.engines.base import make_feeds

    device = engines["dense"].device
    iters = cfg.bench.iterations or (100 if device.startswith("cuda") else 20)
    feeds = make_feeds(engines["dense"].io_spec, cfg.bench.batch or profile.opt_batch, cfg.bench.height or profile.opt_height,
                       cfg.bench.width or profile.opt_width, seed=0)
    res = compare_speed(engines["dense"], engines["slim"], feeds, warmup=cfg.bench.warmup, iterations=iters)
    res["iterations"] = iters
    res["dtype"] = cfg.export.dtype  # what both engines ran in (an fp16 CPU engine is refused before the build)
    from slimexport.engines.torch_runner import device_name

    res["device_name"] = device_name(device)
    return res


def _relative_paths(obj, root: Path):
    """``obj`` with every absolute path string inside ``root`` made relative to it (manifests and reports hold no
    absolute paths into the folder, so a moved or copied folder stays valid)."""
    if isinstance(obj, dict):
        return {k: _relative_paths(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative_paths(v, root) for v in obj]
    if isinstance(obj, str) and os.path.isabs(obj):
        try:
            return Path(obj).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            return obj
    return obj


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "polygraphy", "tensorrt", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def build(cfg, out: str | Path | None = None, progress: bool = True, cache_dir: str | Path | None = None) -> BuildResult | None:
    """The whole pipeline in one call; every stage cached by a content hash of its inputs.

    Writes ``manifest.json``, ``report.json`` and ``report.md`` into the output folder and returns the report.
    A failed parity gate does not raise here: ``BuildResult.passed`` is ``False`` and the report says which
    comparison and metric failed (the CLI turns that into exit code 1).
    """
    from slimexport.engines.onnx_export import export_unet_onnx, read_export
    from slimexport.models.load import load_model
    from slimexport.report import make_report, write_report

    _check_backend_available(cfg.backend)
    device = resolve_engine_device(cfg)
    _check_engine_dtype(cfg, device)
    out_dir = Path(out) if out is not None else default_out(cfg.compress.model, cfg.compress.alloc.budget, f"-{cfg.backend}")
    check_out_dir(out_dir)
    records: dict[str, StageRecord] = {}
    with _Stage(records, "load", False, torch.device("cpu")):
        bundle = load_model(cfg.compress.model, random_weights=cfg.compress.random_weights)
    profile = engine_profile(cfg, bundle)  # checked before the long stages: a bad --height fails in seconds
    res = compress(cfg.compress, out=out_dir, bundle=bundle, progress=progress, cache_dir=cache_dir)
    if res is None:
        return None
    records.update(res.stages)
    manifest = Manifest(out_dir)
    models = {"dense": move(bundle.unet, "cpu", torch.float32).eval(), "slim": res.load_slim()}
    cpu = torch.device("cpu")

    seq_len = int(bundle.encoder.encode([""])[0].shape[1])  # text tokens: 77 for CLIP, 6 for digits
    exports, keys = {}, {}
    upstream = {"dense": bundle.identity(), "slim": manifest.stage("slim")["key"]}
    for kind in ("dense", "slim"):
        keys[kind] = stage_key("export", kind, upstream[kind], cfg.export.to_dict(), profile.to_dict())
        folder = out_dir / "onnx" / kind
        cached = manifest.cached(f"export_{kind}", keys[kind])
        with _Stage(records, f"export_{kind}", cached, cpu):
            if not cached:
                unet = models[kind]
                c = int(unet.config.in_channels)
                r = export_unet_onnx(unet, folder, opset=cfg.export.opset, dtype=cfg.export.dtype, output_name=cfg.export.output_name,
                                     sample_shape=(profile.opt_batch, c, profile.opt_height, profile.opt_width),
                                     context_shape=(profile.opt_batch, seq_len, int(unet.config.cross_attention_dim)))
                manifest.record(f"export_{kind}", keys[kind], [folder], r.export_seconds)
            exports[kind] = read_export(folder)

    engine_key = _engine_key(keys["dense"], keys["slim"], cfg, device)
    with _Stage(records, "engine", manifest.cached("engine", engine_key), torch.device(device)):
        engines = _make_engines(cfg, exports, models, device, profile, out_dir)
        files = [f for e in engines.values() for f in e.files]  # TensorRT plans or AOTI packages, with sidecars
        manifest.record("engine", engine_key, files, 0.0, backend=cfg.backend, device=device,
                        engine_info=_relative_paths({k: e.info() for k, e in engines.items()}, out_dir))
    # Results are reused only when every artifact they were measured on was reused in this run: a file rebuilt here
    # (say, an export that `slimexport verify` found altered) is checked and timed afresh, under the same keys.
    rebuilt = [k for k, r in records.items() if k != "load" and not r.cached]
    try:
        verify_key = _result_key("verify", engine_key, cfg)
        cached = not rebuilt and manifest.cached("verify", verify_key) and (out_dir / "verify.json").exists()
        with _Stage(records, "verify", cached, cpu):
            if cached:
                parity = read_json(out_dir / "verify.json", "verification results")
            else:
                t0 = time.perf_counter()
                parity = run_verify(cfg, bundle, models, engines, profile)
                write_json(out_dir / "verify.json", parity)
                manifest.record("verify", verify_key, [out_dir / "verify.json"], time.perf_counter() - t0)
        bench_key = _result_key("bench", engine_key, cfg)
        cached = not rebuilt and manifest.cached("bench", bench_key) and (out_dir / "bench.json").exists()
        with _Stage(records, "bench", cached, torch.device(device)):
            if cached:
                speed = read_json(out_dir / "bench.json", "benchmark results")
            else:
                t0 = time.perf_counter()
                speed = _relative_paths(run_bench(cfg, engines, profile), out_dir)
                write_json(out_dir / "bench.json", speed)
                manifest.record("bench", bench_key, [out_dir / "bench.json"], time.perf_counter() - t0)
    finally:
        for e in engines.values():
            e.close()

    stages = {k: {"seconds": v.seconds, "cached": v.cached} for k, v in records.items()}
    report = make_report(cfg.compress.model, res.plan, parity, speed, stages,
                         extra={"backend": cfg.backend, "engine_device": device, "profile": profile.to_dict()})
    manifest.set("build_config", cfg.to_dict())
    manifest.set("profile", profile.to_dict())
    manifest.set("io", exports["dense"].io_spec)
    manifest.set("onnx", {k: {"model": os.path.relpath(e.onnx_path, out_dir), "sha256": e.onnx_sha256,
                              "data": os.path.relpath(e.data_path, out_dir), "data_sha256": e.data_sha256, "opset": e.opset,
                              "dtype": e.dtype, "size_bytes": e.size_bytes} for k, e in exports.items()})
    manifest.set("slim_weights", {"path": "slim_unet/diffusion_pytorch_model.safetensors",
                                  "plan_sha256": sha256_json(res.plan["ranks"])})
    manifest.set("versions", _versions())
    gpu = torch.device(device) if device.startswith("cuda") else None
    manifest.set("device", {"engine_device": device, **({"gpu": torch.cuda.get_device_name(gpu),
                            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(gpu)))} if gpu else {})})
    manifest.set("results", _results(report))
    manifest.set("built_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    manifest.save()
    write_report(out_dir, report)
    return BuildResult(out_dir=out_dir, report=report, passed=report["passed"])


def _load_build(folder: str | Path):
    """Read a build folder's manifest and config, reload its model, and check the model is the same one."""
    from slimexport.config import BuildConfig
    from slimexport.errors import ModelNotFoundError
    from slimexport.models.load import load_model

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
        bundle = load_model(cfg.compress.model, random_weights=cfg.compress.random_weights)
    except ModelNotFoundError:  # a relative path given to the Python API, read from another folder: the recorded one
        source = str(manifest.data.get("model", {}).get("source", ""))
        if not (source.startswith("local:") and Path(source[6:]).exists()):
            raise
        bundle = load_model(source[6:], random_weights=cfg.compress.random_weights)
    want = manifest.data.get("model", {}).get("fingerprint")
    if want is not None and bundle.identity() != want:
        raise IncompatibleArtifactError(
            f"model '{cfg.compress.model}' is not the one {folder} was built from (weights fingerprint "
            f"{bundle.identity()[:19]}… here, {want[:19]}… there)", "rebuild the folder with slimexport build",
        )
    return folder, manifest, cfg, bundle


# Backends whose build compiles files into the folder, and those files' suffix: verify and bench load them as built.
COMPILED_SUFFIX = {"aoti": ".pt2", "tensorrt": ".plan"}


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


def _results(report: dict) -> dict:
    """The manifest's summary of a report: the verdict, each comparison's, the speed-up (kept current by verify and bench)."""
    return {"passed": bool(report.get("passed")), "parity": {k: bool(v.get("passed")) for k, v in report.get("parity", {}).items()},
            "speedup": (report.get("speed") or {}).get("speedup")}


# Stages whose records (and files) every finished build has: a manifest without them vouches for nothing.
RECORDED_STAGES = ("slim", "export_dense", "export_slim", "engine")


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
    from slimexport.engines.onnx_export import read_export
    from slimexport.slim.apply import load_slim_unet

    folder, manifest, cfg, bundle = _load_build(folder)
    integrity = _integrity(manifest)
    profile = engine_profile(cfg, bundle)
    device = resolve_engine_device(cfg)
    _check_engine_dtype(cfg, device, folder)
    try:
        models = {"dense": move(bundle.unet, "cpu", torch.float32).eval(), "slim": load_slim_unet(folder / "slim_unet", check=False)}
        exports = {k: read_export(folder / "onnx" / k) for k in ("dense", "slim")}
        compiled = _compiled_engines(manifest, folder, cfg.backend)
        engines = _make_engines(cfg, exports, models, device, profile, folder, compiled)
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
                            record=_same_machine(manifest, cfg, device))
    return BuildResult(out_dir=folder, report=report, passed=report["passed"])


def _write_verdict(folder: Path, manifest: Manifest, cfg, parity: dict | None, integrity: dict, seconds: float,
                   record: bool) -> dict:
    """verify's outcome into report.json/.md and the manifest's results (``parity`` None: the check could not run).

    verify.json holds what build's verify stage holds, under the same key, so a rerun or a later build trusts it: it
    is written only for an intact folder checked on the build's machine (``record``). A verdict on altered files drops
    the stage (a later build that rebuilds them checks afresh); one from another machine leaves the build's alone.
    """
    from slimexport.report import write_report

    if parity is not None and integrity["passed"] and record:
        write_json(folder / "verify.json", parity)
        manifest.record("verify", _result_key("verify", manifest.stage("engine").get("key"), cfg), [folder / "verify.json"], seconds)
    elif not integrity["passed"]:
        manifest.invalidate("verify")
    report = _json_object(folder / "report.json", "report") or {}
    if not report.get("params"):  # report.json deleted or damaged: made again from the plan and the last bench
        report = _remade_report(folder, manifest, cfg) or report
    report["parity"] = {**(parity or {}), "integrity": integrity}  # integrity: of this check only, not in verify.json
    report["passed"] = all(v.get("passed", False) for v in report["parity"].values())
    if report.get("params"):
        write_report(folder, report)
    elif (folder / "report.md").exists():
        (folder / "report.md").unlink()  # stale (it may say PASSED) and cannot be written again without the plan
    manifest.set("results", _results(report))
    manifest.save()
    return report


def _remade_report(folder: Path, manifest: Manifest, cfg) -> dict | None:
    """A build's report from its plan.json, bench.json and manifest (``None`` when the plan is unusable)."""
    from slimexport.report import make_report

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
    from slimexport.engines.onnx_export import read_export
    from slimexport.report import write_report

    folder, manifest, cfg, bundle = _load_build(folder)
    report = _json_object(folder / "report.json", "report") or {}
    if not report.get("params"):  # before timing: fails fast, nothing written
        raise ArtifactError(f"report {folder / 'report.json'} is missing or damaged",
                            f"run slimexport verify {folder} first (it writes the report again)")
    if iterations is not None:
        cfg = cfg.replace(bench=cfg.bench.replace(iterations=iterations))
    profile = engine_profile(cfg, bundle)
    device = resolve_engine_device(cfg)
    _check_engine_dtype(cfg, device, folder)
    exports = {k: read_export(folder / "onnx" / k, verify=True) for k in ("dense", "slim")}
    compiled = _compiled_engines(manifest, folder, cfg.backend)
    models = {}
    if cfg.backend in MODEL_BACKENDS and compiled is None:
        from slimexport.slim.apply import load_slim_unet

        models = {"dense": move(bundle.unet, "cpu", torch.float32).eval(), "slim": load_slim_unet(folder / "slim_unet")}
    engines = _make_engines(cfg, exports, models, device, profile, folder, compiled)
    t0 = time.perf_counter()
    try:
        speed = _relative_paths(run_bench(cfg, engines, profile), folder)
    finally:
        for e in engines.values():
            e.close()
    if _same_machine(manifest, cfg, device):  # else the build's bench stays the build's (this run goes in the report)
        write_json(folder / "bench.json", speed)  # keyed by the settings it was measured with (--iterations included)
        manifest.record("bench", _result_key("bench", manifest.stage("engine").get("key"), cfg), [folder / "bench.json"],
                        time.perf_counter() - t0)
    report["speed"] = speed
    write_report(folder, report)
    manifest.set("results", _results(report))
    manifest.save()
    return BuildResult(out_dir=folder, report=report, passed=report.get("passed", False))
