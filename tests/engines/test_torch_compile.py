"""The ``torch-compile`` backend: in-process ``torch.compile`` of the UNet behind the engine interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimexport.engines.base import EngineConfig, build_engine, make_feeds
from slimexport.engines.torch_compile import MODE_GRAPHS, MODE_PLAIN, TorchCompileEngine


def test_lazy_and_described(dense_unet):
    eng = build_engine("torch-compile", dense_unet)  # nothing compiles before the first call
    assert isinstance(eng, TorchCompileEngine) and eng.mode == MODE_PLAIN
    info = eng.info()
    assert info["backend"] == "torch-compile" and info["compile_mode"] == MODE_PLAIN and not info["cuda_graphs"]
    assert eng.model.unet is dense_unet  # same device and dtype: no copy, and the caller's model is not changed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_select_reduce_overhead(dense_unet):
    eng = build_engine("torch-compile", dense_unet, EngineConfig(device="cuda", cuda_graphs=True, channels_last=True))
    assert eng.mode == MODE_GRAPHS and eng.info()["cuda_graphs"]


@pytest.mark.slow
def test_matches_torch(dense_unet, torch_reference):
    """One Inductor compile of tiny on the CPU (fast when Inductor's on-disk FX graph cache already holds it)."""
    eng = build_engine("torch-compile", dense_unet, EngineConfig())
    feeds = make_feeds(eng.io_spec, 2, 16, 16, seed=3)
    ref = torch_reference(dense_unet, feeds)
    out = eng.run(feeds)["latent"]
    assert float(np.abs(out - ref).max() / np.abs(ref).max()) < 2e-5
    staged = eng.prepare(feeds)()
    assert isinstance(staged, torch.Tensor) and torch.allclose(staged, torch.from_numpy(out), rtol=0, atol=1e-6)
