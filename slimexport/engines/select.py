"""Engine policy: which device and shapes a build's engines get, which backend settings are refused up front, and
making the dense and slim engine pair (``build`` and ``verify``/``bench`` of a folder alike)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from pathlib import Path

import torch

from slimexport.cache import Manifest, stage_key
from slimexport.engines import base
from slimexport.engines.aoti import check_compiler
from slimexport.engines.base import CONTEXT, EngineConfig, EngineProfile
from slimexport.errors import MissingExtraError, SettingError
from slimexport.models.arch import latent_multiple

log = logging.getLogger("slimexport")

# Backends whose engines are made from the torch models (not from the ONNX export); fp32 on the CPU.
MODEL_BACKENDS = ("torch", "aoti", "torch-compile")
# Backends whose build compiles files into the folder, and those files' suffix: verify and bench load them as built.
COMPILED_SUFFIX = {"aoti": ".pt2", "tensorrt": ".plan"}


def engine_profile(cfg, bundle) -> EngineProfile:
    """The engine profile from the build config (pixels and prompts) and the model's sizes."""
    step = bundle.vae_scale_factor * latent_multiple(bundle.unet)

    def around(size: int) -> tuple[int, int, int]:
        def snap(v: float) -> int:
            return max(step, int(round(v / step)) * step)

        return snap(size / 2), snap(size), snap(size * 1.5)

    height = cfg.height or around(bundle.image_size[0])
    width = cfg.width or around(bundle.image_size[1])
    return EngineProfile.from_pixels(batch=cfg.batch, height=height, width=width, vae_scale_factor=bundle.vae_scale_factor,
                                     cfg=True, latent_multiple=latent_multiple(bundle.unet))


def resolve_engine_device(cfg) -> str:
    """``cfg.engine_device`` as a device: ``auto`` is the GPU where the backend can use one, else the CPU."""
    if cfg.engine_device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError(f"BuildConfig.engine_device={cfg.engine_device!r} asked for, but no CUDA GPU is visible",
                           "use BuildConfig.engine_device='cpu' (or 'auto')")
    if cfg.engine_device != "auto":
        return cfg.engine_device  # cuda:N kept: every backend places its engine on that GPU
    if cfg.backend == "openvino" or not torch.cuda.is_available():  # OpenVINO's engines here are CPU engines
        return "cpu"
    if cfg.backend == "onnxruntime":
        import onnxruntime  # heavy: imported only to ask for its GPU provider

        return "cuda" if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else "cpu"
    return "cuda"


def check_backend_available(backend: str) -> None:
    """Refuse, before calibration, a backend whose package or compiler is missing."""
    if backend == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        raise MissingExtraError("tensorrt", "trt", "--backend tensorrt")
    if backend == "openvino" and importlib.util.find_spec("openvino") is None:
        raise MissingExtraError("openvino", "openvino", "--backend openvino")
    if backend == "aoti":
        check_compiler()  # the packages are compiled C++


def check_engine_dtype(cfg, device: str, folder: Path | None = None) -> None:
    """Refuse an fp16 engine the CPU would not run as fp16 (before any work); warn where fp16 is only slower.

    ``folder``: the build folder that verify or bench checks (the fix then is another machine, not other settings).
    """
    if cfg.export.dtype == "bf16":  # OpenVINO only (config refuses it elsewhere): the CPU must compute bf16
        from slimexport.engines.openvino import check_cpu_precision

        check_cpu_precision("bf16")
        return
    if cfg.export.dtype != "fp16" or device.startswith("cuda"):
        return
    if cfg.backend in MODEL_BACKENDS:
        raise SettingError(
            f"ExportConfig.dtype='fp16' with BuildConfig.backend={cfg.backend!r} runs on a GPU only (on the CPU these "
            "engines run fp32)", f"check {folder} on a GPU machine" if folder is not None
            else "drop ExportConfig.dtype='fp16' on the CPU, or pass BuildConfig.engine_device='cuda' on a GPU machine")
    log.warning("fp16 engines on the CPU: ONNX Runtime has few fp16 CPU kernels and casts around the rest, and OpenVINO "
                "computes fp16 exports in fp32, so the engines are no faster than fp32 there (fp16 is for GPUs)")


def engine_config(cfg, device: str, profile: EngineProfile, seq_len: int) -> EngineConfig:
    cuda = device.startswith("cuda")
    eager_like = cuda and cfg.backend in ("torch", "torch-compile")
    return EngineConfig(device=device, profile=profile, dtype=cfg.export.dtype,
                        channels_last=eager_like, cuda_graphs=eager_like,
                        optimization_level=cfg.optimization_level, output_name=cfg.export.output_name, seq_len=seq_len)


def make_engines(cfg, exports: dict, models: dict, device: str, profile, out_dir: Path | None = None,
                 compiled: dict[str, Path] | None = None) -> dict:
    """The dense and slim engines of ``cfg.backend``; ``compiled`` (by kind): load these plans or packages, build nothing."""
    seq_len = next(e["shape"][1] for e in exports["dense"].io_spec["inputs"] if e["name"] == CONTEXT)  # the text tokens
    ecfg = engine_config(cfg, device, profile, seq_len)

    def make(kind: str):
        if compiled is not None:  # checked against this machine on load (IncompatibleArtifactError), never rebuilt
            return base.build_engine(cfg.backend, compiled[kind], ecfg)
        if cfg.backend == "aoti":  # packages in OUT/aoti/<kind>, reused when model, profile, device and torch match
            return base.build_engine("aoti", models[kind], ecfg.replace(cache_dir=None if out_dir is None else str(Path(out_dir) / "aoti" / kind)))
        if cfg.backend == "openvino" and out_dir is not None:  # OpenVINO's compiled-model cache in OUT/openvino/<kind>
            return base.build_engine("openvino", exports[kind].folder, ecfg.replace(cache_dir=str(Path(out_dir) / "openvino" / kind)))
        return base.build_engine(cfg.backend, models[kind] if cfg.backend in MODEL_BACKENDS else exports[kind].folder, ecfg)

    engines = {}
    try:
        for kind in ("dense", "slim"):
            engines[kind] = make(kind)
    except BaseException:
        for e in engines.values():  # the dense engine when the slim one fails: its device memory goes back
            e.close()
        raise
    return engines


def engine_key(dense_export_key: str, slim_export_key: str, cfg, device: str) -> str:
    """Key of the ``engine`` stage: the two exports, the backend and the machine it runs on (device, torch)."""
    return stage_key("engine", dense_export_key, slim_export_key, cfg.backend, device, cfg.optimization_level, torch.__version__,
                     *([_version("openvino")] if cfg.backend == "openvino" else []))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def same_machine(manifest: Manifest, cfg, device: str) -> bool:
    """Whether ``verify DIR``/``bench DIR`` run where the build did: only then are their results the build's stages."""
    key = engine_key(manifest.stage("export_dense").get("key"), manifest.stage("export_slim").get("key"), cfg, device)
    return key == manifest.stage("engine").get("key")
