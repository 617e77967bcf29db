"""Shared fixtures: the tiny SD-shaped model and a small calibration of it (CPU, seconds)."""

from __future__ import annotations

import os

import torch

# Before anything imports triton (diffusers does, at collection): triton decorates its own helpers (tl.cdiv, tl.zeros)
# for the interpreter or the compiler when it is first imported. 1 without CUDA, 0 with; a caller's value wins.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "trt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT"))


@pytest.fixture(scope="session")
def tiny():
    from slimexport.models import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def tiny_calib_cfg():
    from slimexport.config import CalibConfig

    return CalibConfig(num_prompts=6, num_steps=6, num_bins=3, batch_size=3)


@pytest.fixture(scope="session")
def tiny_stats(tiny, tiny_calib_cfg):
    from slimexport.calibrate import calibrate, select_prompts

    prompts = select_prompts(tiny, tiny_calib_cfg)
    return calibrate(tiny, prompts, tiny_calib_cfg, progress=False)


@pytest.fixture(scope="session")
def tiny_inputs(tiny):
    """Fixed CFG-shaped inputs: 2 prompts × (uncond, cond), several timesteps."""
    g = torch.Generator().manual_seed(0)
    cond = tiny.encoder.encode(["a red fox in the snow", "a plain blue sky"])[0]
    uncond = tiny.encoder.encode(["", ""])[0]
    ctx = torch.cat([uncond, cond])
    x = torch.randn(4, 4, 16, 16, generator=g)
    return x, ctx, [999.0, 600.0, 250.0, 1.0]
