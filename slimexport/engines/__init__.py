"""Engines: ONNX export and graph cleanup, ONNX Runtime, TensorRT (imported lazily), the PyTorch runner, and
AOTInductor packages / ``torch.compile`` (the compiled PyTorch engines).

Importing this package loads none of torch, onnx, onnxruntime or tensorrt; each name below is imported from
its module on first use. Every backend has the interface of :class:`slimexport.engines.base.Engine`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": "base", "EngineConfig": "base", "EngineProfile": "base", "build_engine": "base",
    "make_feeds": "base", "unet_io_spec": "base", "io_spec_for_unet": "base",
    "ExportResult": "onnx_export", "export_unet_onnx": "onnx_export", "read_export": "onnx_export",
    "OrtEngine": "onnxruntime", "TorchEngine": "torch_runner", "TrtEngine": "tensorrt",
    "build_trt_engine": "tensorrt", "AotiEngine": "aoti", "build_aoti_package": "aoti",
    "TorchCompileEngine": "torch_compile",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"slimexport.engines.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'slimexport.engines' has no attribute {name!r}")
