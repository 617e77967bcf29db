"""The TensorRT backend: strongly typed engines built from the exported ONNX with Polygraphy's Python API.

- The network is *strongly typed* (``network_from_onnx_path(..., strongly_typed=True)``): every tensor keeps
  its ONNX type, so fp16 comes from an fp16 export (whose norms stay fp32), never from ``BuilderFlag.FP16``
  (removed in TensorRT 11).
- One optimization profile from :class:`~slimexport.engines.base.EngineProfile`; builder optimization level 3
  unless asked otherwise.
- The timing cache is keyed by GPU name, compute capability and TensorRT version (a cache from another GPU or
  version is never mixed in); engine files carry compute capability and TensorRT version in their names
  (``unet.sm90.trt10.8.0.plan``), with a JSON sidecar saying what they were built for and from.
- Loading refuses an engine built for another GPU, compute capability or TensorRT version, naming what differs.
- Before TensorRT runs: Polygraphy at least :data:`POLYGRAPHY_MIN` with TensorRT 11, and a CUDA runtime
  (``libcudart.so*``) where Polygraphy's CUDA wrapper looks for it; otherwise a one-line error with the fix.
- Polygraphy's errors (parser, build, deserialisation, execution context, input shapes) become one-line
  :class:`~slimexport.errors.SlimExportError` s; the plan is written from TensorRT's buffer after the network
  (which holds the weights) is released; the timing cache is replaced atomically, without a lock file.

``tensorrt`` is imported only when an engine is built or loaded; the naming, cache keys, compatibility check
and profile shapes are pure functions, testable anywhere.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimexport.artifacts import atomic_path, read_json, sha256_file, write_json
from slimexport.engines.base import (
    BATCH_AXIS,
    HEIGHT_AXIS,
    TIMESTEP_AXIS,
    WIDTH_AXIS,
    Engine,
    EngineConfig,
    EngineProfile,
    refuse_incompatible,
    sidecar_for,
    sm_tag,
)
from slimexport.errors import ArtifactError, SlimExportError, UsageError, require

log = logging.getLogger(__name__)

ENGINE_STEM = "unet"
PLAN_SUFFIX = ".plan"
SIDECAR_FORMAT = "slimexport.trt/1"
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default; 4-5 search longer for little gain on the UNet
# Polygraphy 0.49.0-0.49.6 always set NetworkDefinitionCreationFlag.EXPLICIT_BATCH, which TensorRT 11 removed
# (network creation raises); 0.49.7 sets it only for TensorRT < 10. Also the floor in pyproject.toml.
POLYGRAPHY_MIN = "0.49.7"
CUDART_GLOB = "libcudart.so*"
CUDART_FALLBACK = "libcudart.so"  # what Polygraphy dlopens by name when its search finds nothing
# Polygraphy 0.49's search (its CUDA wrapper, Linux) before the pip wheel folders were added in 0.53.
POLYGRAPHY_049_DIRS = ("/usr/local/cuda/lib64", "/usr/lib", "/lib")


def _require_trt():
    """``tensorrt``, after checking that Polygraphy can drive it (version, CUDA runtime)."""
    trt = require("tensorrt", "trt", "--backend tensorrt")
    import polygraphy

    check_versions(trt.__version__, polygraphy.__version__)
    check_cudart()
    return trt


# ---------------------------------------------------------------- versions and the CUDA runtime


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"0.49.7"`` -> ``(0, 49, 7)``; ``"10.8.0.43"`` -> ``(10, 8, 0, 43)`` (leading digits of each part)."""
    out = []
    for part in version.split("."):
        digits = re.match(r"\d*", part).group()
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def check_versions(trt_version: str, polygraphy_version: str) -> None:
    """Refuse a Polygraphy that cannot create a TensorRT network with this TensorRT.

    Raises:
        UsageError: TensorRT 11 or newer with Polygraphy older than :data:`POLYGRAPHY_MIN`.
    """
    if _version_tuple(trt_version)[:1] >= (11,) and _version_tuple(polygraphy_version) < _version_tuple(POLYGRAPHY_MIN):
        raise UsageError(f"Polygraphy {polygraphy_version} cannot create networks with TensorRT {trt_version} (it sets "
                         "the EXPLICIT_BATCH flag TensorRT 11 removed)", f"pip install -U 'polygraphy>={POLYGRAPHY_MIN}'")


def polygraphy_cudart_dirs() -> list[str]:
    """The folders Polygraphy's CUDA wrapper searches for ``libcudart.so*``: its own list where it has one
    (0.53: ``LD_LIBRARY_PATH``, system folders, the CUDA 12 pip wheel's ``nvidia/cuda_runtime/lib``), else
    0.49's (``LD_LIBRARY_PATH``, ``/usr/local/cuda/lib64``, ``/usr/lib``, ``/lib``)."""
    try:
        from polygraphy.cuda.cuda import _find_cuda_lib_dirs
    except ImportError:
        return [d for d in (*os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep), *POLYGRAPHY_049_DIRS) if d]
    return [d for d in _find_cuda_lib_dirs() if d]


def other_cudart_dirs() -> list[str]:
    """Where else a CUDA runtime is often installed: pip wheels of any CUDA version (``nvidia/*/lib``, e.g.
    CUDA 13's ``nvidia/cu13/lib``), CUDA toolkits and the distribution's library folders."""
    dirs = [d for p in sys.path if p and os.path.isdir(p) for d in sorted(glob.glob(os.path.join(p, "nvidia", "*", "lib")))]
    dirs += sorted(glob.glob("/usr/local/cuda*/lib64")) + sorted(glob.glob("/usr/local/cuda*/targets/*/lib"))
    dirs += ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64"]
    return list(dict.fromkeys(dirs))


def _loads(name: str) -> bool:
    import ctypes

    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def locate_cudart(search_dirs: list[str] | None = None, other_dirs: list[str] | None = None,
                  loads: Callable[[str], bool] = _loads) -> tuple[str | None, list[str]]:
    """``(the CUDA runtime Polygraphy will load, or None; libcudart files in other_dirs when it finds none)``.

    Polygraphy takes the first ``libcudart.so*`` in ``search_dirs`` (default :func:`polygraphy_cudart_dirs`),
    else dlopens ``libcudart.so`` by name (``loads`` tries that)."""
    for d in polygraphy_cudart_dirs() if search_dirs is None else search_dirs:
        hits = sorted(glob.glob(os.path.join(d, CUDART_GLOB)))
        if hits:
            return hits[0], []
    if loads(CUDART_FALLBACK):
        return CUDART_FALLBACK, []
    other = other_cudart_dirs() if other_dirs is None else other_dirs
    return None, [h for d in other for h in sorted(glob.glob(os.path.join(d, CUDART_GLOB)))]


def check_cudart(search_dirs: list[str] | None = None, other_dirs: list[str] | None = None,
                 loads: Callable[[str], bool] = _loads) -> str | None:
    """The CUDA runtime Polygraphy will load (``None`` off Linux, where this check does not apply).

    Raises:
        UsageError: Polygraphy would not find one, naming the folder to put on ``LD_LIBRARY_PATH`` when a
            ``libcudart.so*`` exists elsewhere (e.g. a pip-only CUDA 13), else what to install.
    """
    if not sys.platform.startswith("linux"):
        return None
    found, elsewhere = locate_cudart(search_dirs, other_dirs, loads)
    if found:
        return found
    what = "Polygraphy's CUDA wrapper would not find the CUDA runtime (libcudart.so*) in LD_LIBRARY_PATH, the folders it searches or the loader's path"
    if elsewhere:
        folder = os.path.dirname(elsewhere[0])
        raise UsageError(f"{what}; there is one at {elsewhere[0]}",
                         f"export LD_LIBRARY_PATH={folder}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}} and rerun")
    raise UsageError(f"{what}, and none was found elsewhere",
                     "install the CUDA runtime your TensorRT was built for (pip install nvidia-cuda-runtime-cu12 for CUDA 12, "
                     "nvidia-cuda-runtime for CUDA 13, or the CUDA toolkit) and put its lib folder on LD_LIBRARY_PATH")


def _first_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # Polygraphy may colour its messages
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)


@contextmanager
def polygraphy_errors(what: str, fix: str, error: type[SlimExportError] = SlimExportError):
    """Turn Polygraphy's exception (what its ``G_LOGGER.critical`` raises on a parser error, a failed build,
    deserialisation, context creation or ``set_input_shape``) into a one-line ``error(what (reason), fix)``;
    TensorRT's own log lines stay above it."""
    from polygraphy.exception import PolygraphyException

    try:
        yield
    except PolygraphyException as err:
        raise error(f"{what} ({_first_line(err)})", fix) from err


# ---------------------------------------------------------------- pure parts: names, keys, compatibility


@dataclass(frozen=True)
class DeviceInfo:
    """What an engine is tied to.

    Attributes:
        gpu_name: e.g. ``NVIDIA H100 80GB HBM3``.
        compute_capability: ``major.minor``, e.g. ``9.0``.
        trt_version: TensorRT's full version string, e.g. ``10.8.0.43``.
    """

    gpu_name: str
    compute_capability: str
    trt_version: str

    def to_dict(self) -> dict:
        return asdict(self)


def trt_tag(trt_version: str) -> str:
    """``"10.8.0.43"`` -> ``"trt10.8.0"`` (major.minor.patch)."""
    parts = trt_version.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:3]):
        raise UsageError(f"TensorRT version {trt_version!r} is not of the form major.minor[.patch]", "pass e.g. '10.8.0'")
    return "trt" + ".".join(parts[:3])


def engine_filename(compute_capability: str | tuple[int, int], trt_version: str, stem: str = ENGINE_STEM) -> str:
    """``unet.sm90.trt10.8.0.plan``: the name says which GPUs and TensorRT can load it."""
    return f"{stem}.{sm_tag(compute_capability)}.{trt_tag(trt_version)}{PLAN_SUFFIX}"


def sidecar_path(plan: str | Path) -> Path:
    """``unet.sm90.trt10.8.0.plan`` -> ``unet.sm90.trt10.8.0.json``."""
    return sidecar_for(plan, PLAN_SUFFIX)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def timing_cache_key(gpu_name: str, compute_capability: str | tuple[int, int], trt_version: str) -> str:
    """``nvidia-h100-80gb-hbm3.sm90.trt10.8.0``: tactic timings are valid for one GPU model and TensorRT version."""
    return f"{_slug(gpu_name)}.{sm_tag(compute_capability)}.{trt_tag(trt_version)}"


def timing_cache_filename(info: DeviceInfo) -> str:
    return f"timing.{timing_cache_key(info.gpu_name, info.compute_capability, info.trt_version)}.cache"


def incompatibilities(built: Mapping[str, Any], here: DeviceInfo) -> list[str]:
    """What differs between the machine an engine was built for (its sidecar) and this one; empty: loadable."""
    out = []
    if built.get("compute_capability") != here.compute_capability:
        out.append(f"compute capability {built.get('compute_capability')} vs {here.compute_capability} here")
    if built.get("gpu_name") != here.gpu_name:
        out.append(f"GPU '{built.get('gpu_name')}' vs '{here.gpu_name}' here")
    if built.get("trt_version") != here.trt_version:
        out.append(f"TensorRT {built.get('trt_version')} vs {here.trt_version} here")
    return out


def check_compatible(built: Mapping[str, Any], here: DeviceInfo, plan: str | Path = "the engine") -> None:
    """Refuse an engine built for another GPU, compute capability or TensorRT version.

    Raises:
        IncompatibleArtifactError: naming each difference.
    """
    refuse_incompatible(incompatibilities(built, here), f"TensorRT engine {plan} was built for another machine",
                        "rebuild it on this machine (slimexport build --backend tensorrt); engines are not portable "
                        "across GPUs or TensorRT versions")


CACHE_H_AXIS, CACHE_W_AXIS = "Hc", "Wc"  # the step-cache tensor's spatial axes (slimexport.stepcache.export)


def profile_shapes(profile: EngineProfile, io_spec: dict) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input name: (min shape, opt shape, max shape)}`` for ``polygraphy.backend.trt.Profile.add``.

    The timestep's own axis ``Bt`` (1 or 2B) spans 1 to the largest batch, so one engine takes both. An input with a
    ``scale`` (a step-cache pair's ``cache``, :func:`slimexport.stepcache.export.pair_io_specs`) has its own spatial
    axes ``Hc``/``Wc``: the latent size over that scale, rounded up."""
    out = {}
    for entry in io_spec["inputs"]:
        shapes = []
        scale = int(entry.get("scale", 1))
        for k in ("min", "opt", "max"):
            h, w = getattr(profile, f"{k}_height"), getattr(profile, f"{k}_width")
            dims = {BATCH_AXIS: getattr(profile, f"{k}_batch"), HEIGHT_AXIS: h, WIDTH_AXIS: w,
                    TIMESTEP_AXIS: 1 if k == "min" else getattr(profile, f"{k}_batch"),
                    **({CACHE_H_AXIS: -(-h // scale), CACHE_W_AXIS: -(-w // scale)} if "scale" in entry else {})}
            shape = []
            for d in entry["shape"]:
                if isinstance(d, str) and d not in dims:
                    raise UsageError(f"input {entry['name']} has a dynamic axis {d!r} the profile does not cover",
                                     "export with the standard axes 2B, Bt, H, W")
                shape.append(dims[d] if isinstance(d, str) else int(d))
            shapes.append(tuple(shape))
        out[entry["name"]] = tuple(shapes)
    return out


def reusable(sidecar: Mapping[str, Any], *, onnx_sha256: str, data_sha256: Mapping[str, str], profile: EngineProfile,
             optimization_level: int, here: DeviceInfo) -> bool:
    """True when an engine on disk was built from this ONNX and these weights (``data_sha256``, as
    :func:`external_data_sha256`), with this profile and level, for this machine (engines are reused by content,
    never by file existence alone; a sidecar without the weights' digests never matches)."""
    return (
        sidecar.get("format") == SIDECAR_FORMAT
        and sidecar.get("onnx_sha256") == onnx_sha256
        and sidecar.get("data_sha256") == dict(data_sha256)
        and sidecar.get("profile") == profile.to_dict()
        and sidecar.get("optimization_level") == optimization_level
        and not incompatibilities(sidecar, here)
    )


def cuda_index(device: str) -> int:
    """``cuda:N`` -> N; ``cuda`` (or ``cpu``, which TensorRT replaces) -> 0."""
    _, _, index = device.partition(":")
    if index and not index.isdigit():
        raise UsageError(f"device {device!r} is not cuda or cuda:N", "pass e.g. cuda:1")
    return int(index or 0)


def external_data_sha256(onnx_path: str | Path) -> dict[str, str]:
    """``{file: sha256}`` of the external-data files ``onnx_path`` references (the export's ``model.onnx_data``,
    which holds every initializer of 1 KiB or more): ``model.onnx`` alone does not change with the weights.

    Raises:
        ArtifactError: a referenced file is missing.
    """
    import onnx

    onnx_path = Path(onnx_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    files = sorted({e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                    for e in t.external_data if e.key == "location"})
    out = {}
    for name in files:
        path = onnx_path.parent / name
        if not path.exists():
            raise ArtifactError(f"{path}, the weights {onnx_path.name} references, is missing",
                                "re-export the model (slimexport build)")
        out[name] = sha256_file(path)
    return out


# ---------------------------------------------------------------- parts that need a GPU and TensorRT


@contextmanager
def _on_device(index: int):
    """Make ``cuda:index`` current: TensorRT builds, deserialises and runs on the current CUDA device."""
    import torch

    with torch.cuda.device(index):
        yield


def current_device_info(device: str = "cuda:0") -> DeviceInfo:
    """GPU name and compute capability (via PyTorch) of the GPU :func:`cuda_index` picks (the one the engine is
    built and run on: ``cuda`` is GPU 0, not torch's current device) and the installed TensorRT's version.

    Raises:
        MissingExtraError: TensorRT is not installed. UsageError: no CUDA GPU, or no GPU of that index.
    """
    trt = _require_trt()
    import torch

    if not torch.cuda.is_available():
        raise UsageError("the tensorrt backend needs a CUDA GPU and PyTorch sees none", "use --backend onnxruntime on CPU")
    index, count = cuda_index(device), torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"device {device} does not exist: PyTorch sees {count} GPU(s)", f"pass cuda:0..cuda:{count - 1}")
    dev = torch.device("cuda", index)
    major, minor = torch.cuda.get_device_capability(dev)
    return DeviceInfo(torch.cuda.get_device_name(dev), f"{major}.{minor}", trt.__version__)


@contextmanager
def _timing_cache_file(cache: Path):
    """An open file for Polygraphy to save the timing cache into; it replaces ``cache`` only when the block
    succeeds (a failed or interrupted build leaves the old cache whole)."""
    with atomic_path(cache) as tmp, open(tmp, "w+b") as f:
        yield f
        if f.tell() == 0 and cache.exists():  # nothing saved: keep what there was
            f.write(cache.read_bytes())


def _write_plan(plan: Path, data) -> None:
    """Write TensorRT's serialized engine (an ``IHostMemory``) from its own buffer: no ``bytes`` copy."""
    with atomic_path(plan) as tmp, open(tmp, "wb") as f:
        f.write(memoryview(data))


@dataclass(frozen=True)
class TrtBuildResult:
    plan: Path
    sidecar: dict
    reused: bool


def build_trt_engine(onnx_path: str | Path, out_dir: str | Path, profile: EngineProfile, *,
                     optimization_level: int = DEFAULT_OPT_LEVEL, cache_dir: str | Path | None = None,
                     stem: str = ENGINE_STEM, device: str = "cuda:0", io_spec: dict | None = None,
                     rebuild: bool = False) -> TrtBuildResult:
    """Build (or reuse) a strongly typed engine for ``onnx_path`` with one optimization profile.

    Args:
        onnx_path: ``model.onnx`` (with ``model.onnx_data`` beside it) or its export folder.
        out_dir: where ``<stem>.sm<cc>.trt<ver>.plan`` and its ``.json`` sidecar go.
        profile: min/opt/max batch, height, width (latent cells).
        optimization_level: builder optimization level 0..5.
        cache_dir: folder of timing caches (``timing.<gpu>.sm<cc>.trt<ver>.cache``); default ``out_dir``. The
            cache is read before the build and replaced atomically after it.
        device: ``cuda`` (GPU 0) or ``cuda:N``.
        rebuild: build even if a matching engine exists.

    Raises:
        MissingExtraError: TensorRT is not installed. ArtifactError: TensorRT cannot parse the ONNX.
        SlimExportError: the build fails (TensorRT's log above says why). UsageError: see :func:`_require_trt`.
    """
    trt = _require_trt()
    from polygraphy.backend.trt import (
        CreateConfig,
        Profile,
        engine_bytes_from_network,
        network_from_onnx_path,
    )

    from slimexport.engines.onnxruntime import io_spec_from_model, resolve_onnx

    onnx_path = resolve_onnx(onnx_path)
    io_spec = io_spec or io_spec_from_model(onnx_path)
    here = current_device_info(device)
    out_dir = Path(out_dir)
    plan = out_dir / engine_filename(here.compute_capability, here.trt_version, stem)
    onnx_sha, data_sha = sha256_file(onnx_path), external_data_sha256(onnx_path)
    side = sidecar_path(plan)
    if not rebuild and plan.exists() and side.exists():
        old = read_json(side, "engine sidecar")
        if reusable(old, onnx_sha256=onnx_sha, data_sha256=data_sha, profile=profile,
                    optimization_level=optimization_level, here=here) and old.get("plan_sha256") == sha256_file(plan):
            log.info("reusing %s (same ONNX, weights, profile, level and machine)", plan)
            return TrtBuildResult(plan, old, True)
    cache = Path(cache_dir or out_dir) / timing_cache_filename(here)
    cache.parent.mkdir(parents=True, exist_ok=True)
    trt_profile = Profile()
    for name, (lo, opt, hi) in profile_shapes(profile, io_spec).items():
        trt_profile.add(name, min=lo, opt=opt, max=hi)
    # File objects, not paths: with a path Polygraphy rewrites the cache in place and leaves a .lock file beside it.
    config = CreateConfig(profiles=[trt_profile], builder_optimization_level=optimization_level,
                          load_timing_cache=io.BytesIO(cache.read_bytes()) if cache.exists() else None)
    log.info("building TensorRT engine %s (optimization level %d): this takes minutes", plan.name, optimization_level)
    t0 = time.perf_counter()
    with _on_device(cuda_index(device)):  # tactics are timed on, and the engine made for, the configured GPU
        with polygraphy_errors(f"TensorRT could not parse {onnx_path}", "see TensorRT's messages above; re-export the "
                               "model (slimexport build), and report the node they name if it persists", ArtifactError):
            network = network_from_onnx_path(str(onnx_path), strongly_typed=True)
        with _timing_cache_file(cache) as cache_out, polygraphy_errors(
                f"TensorRT could not build an engine from {onnx_path}", "see TensorRT's messages above; out of GPU "
                "memory: narrow the profile (--batch/--height/--width) or lower --optimization-level"):
            data = engine_bytes_from_network(network, config=config, save_timing_cache=cache_out)
        del network  # builder, network and parser: the parser holds a copy of the weights
    seconds = time.perf_counter() - t0
    _write_plan(plan, data)
    del data
    sidecar = {
        "format": SIDECAR_FORMAT, **here.to_dict(), "onnx": onnx_path.name, "onnx_sha256": onnx_sha,
        "data_sha256": data_sha, "plan_sha256": sha256_file(plan), "profile": profile.to_dict(),
        "optimization_level": optimization_level, "strongly_typed": True, "build_seconds": round(seconds, 1),
        "timing_cache": cache.name, "io_spec": io_spec, "tensorrt_module": trt.__name__,
    }
    write_json(side, sidecar)
    return TrtBuildResult(plan, sidecar, False)


class TrtEngine(Engine):
    """A deserialized TensorRT engine behind the engine interface (Polygraphy ``TrtRunner``)."""

    name = "tensorrt"

    def __init__(self, plan: str | Path, cfg: EngineConfig | None = None):
        _require_trt()
        from polygraphy.backend.trt import TrtRunner, engine_from_bytes

        cfg = cfg or EngineConfig(device="cuda")
        plan = Path(plan)
        side = sidecar_path(plan)
        if not plan.exists() or not side.exists():
            raise ArtifactError(f"TensorRT engine {plan} or its sidecar {side.name} is missing",
                                "build it (slimexport build --backend tensorrt)")
        self.sidecar = read_json(side, "engine sidecar")
        self.here = current_device_info(cfg.device)
        check_compatible(self.sidecar, self.here, plan)
        if self.sidecar.get("plan_sha256") != sha256_file(plan):
            raise ArtifactError(f"TensorRT engine {plan} does not match its sidecar's sha256", "rebuild it")
        self.plan = plan
        self.files = (plan, side)
        self.io_spec = self.sidecar["io_spec"]
        built = EngineProfile.from_dict(self.sidecar["profile"])
        self.profile = built if cfg.profile is None else cfg.profile.narrowed_to(
            built, "TensorRT engine", "rebuild the engine for this profile (slimexport build --backend tensorrt with "
            "--batch/--height/--width MIN,OPT,MAX) or leave EngineConfig.profile unset to use the engine's")
        self.index = cuda_index(cfg.device)
        self.device = f"cuda:{self.index}"
        self.runner = None
        with _on_device(self.index):  # the engine, its context and stream live on the configured GPU
            with polygraphy_errors(f"TensorRT could not deserialize {plan}", "rebuild it (slimexport build --backend "
                                   "tensorrt); see TensorRT's messages above", ArtifactError):
                engine = engine_from_bytes(plan.read_bytes())
            runner = TrtRunner(engine, name=plan.stem)
            with polygraphy_errors(f"TensorRT could not create an execution context for {plan.name} on {self.device}",
                                   "see TensorRT's messages above; free GPU memory or rebuild with a narrower profile"):
                runner.activate()
        self.runner = runner

    def _infer(self, feeds: Mapping[str, Any], **kw) -> dict:
        from polygraphy.exception import PolygraphyException

        try:
            with _on_device(self.index):
                return self.runner.infer(feeds, check_inputs=False, **kw)
        except PolygraphyException as err:  # as polygraphy_errors, with the message made only on failure
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
            raise SlimExportError(f"TensorRT could not run {self.plan.name} on {shapes} ({_first_line(err)})",
                                  f"see TensorRT's messages above; the engine's profile is {self.profile.describe()}") from err

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        # copies: Polygraphy returns views of host buffers it reuses, which the next call overwrites
        return {k: np.array(v, copy=True) for k, v in outs.items()}

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        """Inputs are staged on the GPU once (as torch tensors, as the engine takes them); outputs stay there."""
        import torch

        staged = {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in self.check(feeds).items()}
        return lambda: self._infer(staged, copy_outputs_to_host=False)

    def info(self) -> dict:
        return {"backend": self.name, "device": self.device, "device_name": self.here.gpu_name,
                "compute_capability": self.here.compute_capability, "plan": self.plan.name,
                "versions": {"tensorrt": self.here.trt_version}}

    def close(self) -> None:
        if getattr(self, "runner", None) is not None and self.runner.is_active:
            with _on_device(self.index):
                self.runner.deactivate()
        self.runner = None


def create(source, cfg: EngineConfig) -> TrtEngine:
    """Registry factory: ``source`` is a ``.plan`` file, or an export folder / ``model.onnx`` to build (or reuse)
    an engine beside, for ``cfg.profile``."""
    _require_trt()
    path = Path(source)
    if path.suffix == PLAN_SUFFIX:
        return TrtEngine(path, cfg)
    if cfg.profile is None:
        raise UsageError("building a TensorRT engine needs a shape profile",
                         "set EngineConfig.profile (CLI: --batch/--height/--width MIN,OPT,MAX)")
    folder = path if path.is_dir() else path.parent
    res = build_trt_engine(path, folder, cfg.profile, optimization_level=cfg.optimization_level,
                           cache_dir=cfg.cache_dir, device=cfg.device if cfg.device != "cpu" else "cuda:0")
    return TrtEngine(res.plan, cfg)
