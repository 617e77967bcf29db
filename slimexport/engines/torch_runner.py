"""The PyTorch backend: the UNet in eager mode behind the engine interface (reference and baseline).

On CUDA it can run in fp16, in channels_last (NHWC) layout and through CUDA graphs (one captured graph per
input shape, replayed), the settings a fair PyTorch speed baseline needs: eager PyTorch spends about a quarter
of the SD1.4 UNet's GPU time converting NCHW↔NHWC, and launch overhead is large at small batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from slimexport.engines.base import (
    CONTEXT,
    SAMPLE,
    TIMESTEP,
    Engine,
    EngineConfig,
    io_spec_for_unet,
)
from slimexport.errors import UsageError
from slimexport.kernels.dispatch import graph_timing
from slimexport.models.bundle import Fp32Norm, converted_copy  # noqa: F401  (re-exported)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
GRAPH_WARMUP_CALLS = 3  # eager calls on a side stream before capture (lazy cuDNN/cuBLAS init; torch docs)


@contextlib.contextmanager
def exact_fp32(active: bool):
    """No TF32 inside: fp32 convolutions and matmuls on an Ampere-or-newer GPU otherwise run in TF32 (cuDNN's default),
    about 1e-3 off fp32, which fails the fp32 parity gate. Restores the process's settings after."""
    if not active:
        yield
        return
    try:  # the legacy flags, unless the process has used torch's newer fp32_precision API (mixing them raises)
        flags = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
        saved = [getattr(obj, name) for obj, name, _ in flags]
    except RuntimeError:
        flags = [(torch.backends.cudnn.conv, "fp32_precision", "ieee"), (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
        saved = [getattr(obj, name) for obj, name, _ in flags]
    for obj, name, value in flags:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for (obj, name, _), old in zip(flags, saved):
            setattr(obj, name, old)


class UNetIO(nn.Module):
    """``(sample, timestep, encoder_hidden_states) -> latent``: a diffusers UNet with the engines' I/O.

    ``timestep`` stays float32 whatever the UNet's dtype: diffusers builds the sinusoidal embedding in fp32
    and casts the embedding (not the timestep) to the sample's dtype.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def device_name(device: str) -> str:
    """Human-readable name of ``cpu`` (the CPU model) or ``cuda:N`` (the GPU)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask), not the machine's total."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class TorchEngine(Engine):
    """Eager PyTorch behind the engine interface.

    The UNet is used as given when its device and dtype already match ``cfg``; otherwise a converted copy is
    made (the caller's model is never cast or moved in place; it is put in eval mode).
    """

    name = "torch"

    def __init__(self, unet: nn.Module, cfg: EngineConfig | None = None):
        cfg = cfg or EngineConfig()
        self.cfg = cfg
        self.profile = cfg.profile
        dev = torch.device(cfg.device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"device {cfg.device} was asked for but PyTorch sees no CUDA GPU",
                                 "pass --engine-device cpu or install a CUDA build of PyTorch")
            dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        self.device = str(dev)
        self.dtype = TORCH_DTYPES[cfg.dtype]
        self.exact = dev.type == "cuda" and self.dtype == torch.float32  # fp32 engines run without TF32
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)  # process-wide: PyTorch has no per-model thread pool
        self.io_spec = io_spec_for_unet(unet, dtype=cfg.dtype, output_name=cfg.output_name, seq_len=cfg.seq_len)
        self.output_name = cfg.output_name
        model = converted_copy(unet.eval(), device=dev, dtype=self.dtype)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.channels_last:
            if model is unet:  # never change the caller's weights' layout
                model = converted_copy(unet, device=dev, dtype=self.dtype, force_copy=True)
            model = model.to(memory_format=torch.channels_last)  # 4-D (conv) weights only
        self.model = UNetIO(model).eval()
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}

    def _to_device(self, feeds: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in feeds.items():
            t = torch.from_numpy(np.ascontiguousarray(v)).to(self.device, non_blocking=True)
            if k == SAMPLE and t.ndim == 4:
                t = t.contiguous(memory_format=self.memory_format)
            out[k] = t
        return out

    @torch.inference_mode()
    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with exact_fp32(self.exact):  # also while a CUDA graph is captured: its kernels keep the setting
            return self.model(inputs[SAMPLE], inputs[TIMESTEP], inputs[CONTEXT])

    def _graph_for(self, inputs: dict[str, torch.Tensor]):
        key = tuple((k, tuple(v.shape)) for k, v in sorted(inputs.items()))
        if key not in self._graphs:
            static = {k: v.clone() for k, v in inputs.items()}
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), graph_timing():  # kernel choices for graph replays, not eager calls
                for _ in range(GRAPH_WARMUP_CALLS):
                    self._forward(static)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph):
                out = self._forward(static)
            self._graphs[key] = (graph, static, out)
        return self._graphs[key]

    def _call(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.cfg.cuda_graphs:
            return self._forward(inputs)
        graph, static, out = self._graph_for(inputs)
        for k, v in inputs.items():
            if v is not static[k]:
                static[k].copy_(v)
        graph.replay()
        return out

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self._call(self._to_device(feeds))
        return {self.output_name: out.detach().to("cpu", memory_format=torch.contiguous_format).numpy().copy()}

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], Any]:
        """Inputs are copied to the device once; the returned call leaves its output on the device."""
        inputs = self._to_device(self.check(feeds))  # a [1] timestep repeated to the batch
        if self.cfg.cuda_graphs:
            graph, static, out = self._graph_for(inputs)
            for k, v in inputs.items():
                static[k].copy_(v)
            return graph.replay
        return lambda: self._forward(inputs)

    def info(self) -> dict:
        return {
            "backend": self.name, "device": self.device, "device_name": device_name(self.device),
            "threads": torch.get_num_threads(), "dtype": self.cfg.dtype, "channels_last": self.cfg.channels_last,
            "cuda_graphs": self.cfg.cuda_graphs,
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
        }

    def close(self) -> None:
        """Drop the CUDA graphs and the engine's model (its device copy: the memory goes back to the allocator)."""
        self._graphs.clear()
        self.model = None


def create(source, cfg: EngineConfig) -> TorchEngine:
    """Registry factory: ``source`` is a ``UNet2DConditionModel`` or a slim UNet folder."""
    from slimexport.engines.base import unet_from_source

    return TorchEngine(unet_from_source(source, "torch"), cfg)
