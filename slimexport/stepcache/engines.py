"""Engines of a step-cache pair on any backend: the exported ONNX graphs (ONNX Runtime, OpenVINO, TensorRT), the
PyTorch paths (torch), or the paths compiled by AOTInductor (aoti)."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from slimexport.stepcache.export import CACHE, FULL_DIR, SHALLOW_DIR, pair_io_specs
from slimexport.stepcache.unet import FullPath, ShallowPath, SplitUNet, cache_scale


def aoti_variants(unet: nn.Module, depth: int, dtype: str = "fp32", seq_len: int = 77) -> tuple:
    """The two :class:`~slimexport.engines.aoti.Variant` of the pair: what AOTInductor compiles for each path."""
    from slimexport.engines.aoti import Variant

    full_spec, shallow_spec = pair_io_specs(unet, depth, dtype=dtype, seq_len=seq_len)

    def cache_of(wrapped, args):  # the shallow path's example cache: the full path's at the traced size
        return (wrapped.split.full(*args)[1],)

    return (Variant(f"full{depth}", full_spec, lambda m: FullPath(SplitUNet(m, depth))),
            Variant(f"shallow{depth}", shallow_spec, lambda m: ShallowPath(SplitUNet(m, depth)), extra=cache_of,
                    scaled={CACHE: cache_scale(unet, depth)}))


def aoti_pair(unet: nn.Module, depth: int, cfg) -> tuple:
    """``(full, shallow)`` AOTInductor engines of ``unet``'s pair: two packages compiled into (or reused from)
    ``cfg.cache_dir``."""
    from slimexport.engines.aoti import AotiEngine, build_aoti_package, default_profile

    profile = cfg.profile or default_profile(unet)
    engines = []
    try:
        for variant in aoti_variants(unet, depth, cfg.dtype, cfg.seq_len):
            res = build_aoti_package(unet, cfg.cache_dir, profile, dtype=cfg.dtype, device=cfg.device, seq_len=cfg.seq_len,
                                     variant=variant)
            engines.append(AotiEngine(res.package, cfg, reused=res.reused))
    except BaseException:
        for e in engines:
            e.close()
        raise
    return engines[0], engines[1]


def pair_engines(backend: str, unet, folder: Path, depth: int, ecfg) -> tuple:
    """``(full, shallow)`` engines of one UNet's pair: its exported graphs in ``folder``, or its PyTorch paths
    (eager, or compiled by AOTInductor into ``<build>/aoti/<folder name>``)."""
    from slimexport.engines.base import build_engine

    if backend == "torch":
        from slimexport.stepcache.torch_pair import torch_pair

        return torch_pair(unet, depth, ecfg)
    if backend == "aoti":
        return aoti_pair(unet, depth, ecfg.replace(cache_dir=str(Path(folder).parent.parent / "aoti" / Path(folder).name)))
    full = build_engine(backend, Path(folder) / FULL_DIR, ecfg)
    try:
        return full, build_engine(backend, Path(folder) / SHALLOW_DIR, ecfg)
    except BaseException:
        full.close()
        raise
