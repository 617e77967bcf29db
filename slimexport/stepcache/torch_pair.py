"""The step-cache pair on the PyTorch backend: the full and the shallow path of a UNet as engines, no export.

The same engine as ``--backend torch`` (:class:`~slimexport.engines.torch_runner.TorchEngine`: eager, or on CUDA
fp16, channels_last and one CUDA graph per input shape), running :class:`~slimexport.stepcache.unet.FullPath`
(``latent, cache`` out) or :class:`~slimexport.stepcache.unet.ShallowPath` (``cache`` in) with the pair's I/O
(:func:`~slimexport.stepcache.export.pair_io_specs`), so :class:`~slimexport.stepcache.export.CachedEngineUNet`
drives it like the ONNX pair.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn

from slimexport.engines.base import CONTEXT, SAMPLE, TIMESTEP, EngineConfig
from slimexport.engines.torch_runner import TorchEngine, exact_fp32
from slimexport.errors import UsageError
from slimexport.stepcache.export import CACHE, FULL_DIR, SHALLOW_DIR, pair_io_specs
from slimexport.stepcache.unet import FullPath, ShallowPath, SplitUNet

PARTS = (FULL_DIR, SHALLOW_DIR)


class TorchPairEngine(TorchEngine):
    """One path (``part``: ``full`` or ``shallow``) of ``unet`` split at ``depth``, as a PyTorch engine."""

    def __init__(self, unet: nn.Module, depth: int, part: str, cfg: EngineConfig | None = None):
        if part not in PARTS:
            raise UsageError(f"step-cache part {part!r}", f"use one of {', '.join(PARTS)}")
        cfg = cfg or EngineConfig()
        super().__init__(unet, cfg)  # the converted copy (device, dtype, layout) is self.model.unet
        split = SplitUNet(self.model.unet, depth)
        self.part = part
        self.model = (FullPath(split) if part == FULL_DIR else ShallowPath(split)).eval()
        full, shallow = pair_io_specs(unet, depth, dtype=cfg.dtype, output_name=cfg.output_name, seq_len=cfg.seq_len)
        self.io_spec = full if part == FULL_DIR else shallow

    @torch.inference_mode()
    def _forward(self, inputs: dict[str, torch.Tensor]):
        args = [inputs[SAMPLE], inputs[TIMESTEP], inputs[CONTEXT]] + ([inputs[CACHE]] if self.part == SHALLOW_DIR else [])
        with exact_fp32(self.exact):
            return self.model(*args)

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._call(self._to_device(feeds))
        outs = out if isinstance(out, tuple) else (out,)
        names = [o["name"] for o in self.io_spec["outputs"]]
        return {n: t.detach().to("cpu", memory_format=torch.contiguous_format).numpy().copy() for n, t in zip(names, outs)}

    def info(self) -> dict:
        return {**super().info(), "stepcache_part": self.part}


def torch_pair(unet: nn.Module, depth: int, cfg: EngineConfig | None = None) -> tuple[TorchPairEngine, TorchPairEngine]:
    """``(full, shallow)`` PyTorch engines of ``unet`` at cache ``depth`` (each holds its own converted copy)."""
    return TorchPairEngine(unet, depth, FULL_DIR, cfg), TorchPairEngine(unet, depth, SHALLOW_DIR, cfg)
