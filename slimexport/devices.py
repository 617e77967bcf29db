"""The calibration's device and dtype from their settings (``auto``: the GPU in fp16 when one is visible)."""

from __future__ import annotations

import torch

from slimexport.errors import SettingError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"CompressConfig.device={device!r} asked for, but no CUDA GPU is visible",
                           "use CompressConfig.device='cpu' (or 'auto')")
    return d


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    if dt is not torch.float32 and device.type == "cpu":
        raise SettingError(f"CompressConfig.calib_dtype={name!r} on the CPU is slow and imprecise",
                           "use CompressConfig.calib_dtype='fp32' (or 'auto') on the CPU")
    return dt
