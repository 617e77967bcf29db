"""The ``torch-compile`` backend: the UNet through in-process ``torch.compile`` (Inductor), the fair PyTorch
baseline next to the AOTInductor packages and TensorRT.

It is :class:`~slimexport.engines.torch_runner.TorchEngine` with the model wrapped in ``torch.compile``:
same weights, dtype and channels_last handling. ``EngineConfig.cuda_graphs`` selects Inductor's
``reduce-overhead`` mode (CUDA graph trees, one graph per input shape) instead of the eager runner's manual
capture; without it the ``default`` mode. Compilation happens on the first call of each new input shape
(minutes for SD1.x on a GPU); Inductor's on-disk FX graph cache makes a later process much faster.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimexport.engines.base import CONTEXT, SAMPLE, TIMESTEP, EngineConfig
from slimexport.engines.torch_runner import TorchEngine, exact_fp32

MODE_GRAPHS = "reduce-overhead"  # Inductor with CUDA graph trees
MODE_PLAIN = "default"


class TorchCompileEngine(TorchEngine):
    """``torch.compile(UNetIO(unet), mode=...)`` behind the engine interface.

    Attributes:
        mode: ``reduce-overhead`` (CUDA graphs) or ``default``.
    """

    name = "torch-compile"

    def __init__(self, unet: nn.Module, cfg: EngineConfig | None = None):
        cfg = cfg or EngineConfig()
        super().__init__(unet, cfg.replace(cuda_graphs=False))  # graphs come from the compile mode, not manual capture
        self.cfg = cfg
        self.mode = MODE_GRAPHS if cfg.cuda_graphs else MODE_PLAIN
        self.compiled = torch.compile(self.model, mode=self.mode)

    @torch.inference_mode()
    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.mode == MODE_GRAPHS:
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: earlier outputs may be overwritten
        with exact_fp32(self.exact):
            return self.compiled(inputs[SAMPLE], inputs[TIMESTEP], inputs[CONTEXT])

    def _call(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._forward(inputs)

    def prepare(self, feeds):
        """Inputs are copied to the device once; the returned call leaves its output on the device."""
        inputs = self._to_device(self.check(feeds))  # a [1] timestep repeated to the batch
        return lambda: self._forward(inputs)

    def close(self) -> None:
        super().close()
        self.compiled = None

    def info(self) -> dict:
        return {**super().info(), "backend": self.name, "cuda_graphs": self.cfg.cuda_graphs, "compile_mode": self.mode}


def create(source, cfg: EngineConfig) -> TorchCompileEngine:
    """Registry factory: ``source`` is a ``UNet2DConditionModel`` or a slim UNet folder."""
    from slimexport.engines.base import unet_from_source

    return TorchCompileEngine(unet_from_source(source, "torch-compile"), cfg)
