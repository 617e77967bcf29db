from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from slimexport.engines.base import EngineConfig, EngineProfile, build_engine, make_feeds
from slimexport.engines.torch_runner import Fp32Norm, TorchEngine, converted_copy

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_matches_direct_call(slim_unet, torch_reference):
    eng = build_engine("torch", slim_unet)
    assert isinstance(eng, TorchEngine) and eng.device == "cpu"
    assert eng.model.unet is slim_unet  # same device and dtype: no copy
    feeds = make_feeds(eng.io_spec, 3, 24, 32, seed=4)
    out = eng.run(feeds)["latent"]
    np.testing.assert_array_equal(out, torch_reference(slim_unet, feeds))
    out2 = eng.prepare(feeds)()
    assert torch.equal(out2, torch.from_numpy(out))
    info = eng.info()
    assert info["backend"] == "torch" and info["threads"] >= 1 and info["versions"]["torch"] == torch.__version__


def test_output_name_and_profile(dense_unet):
    cfg = EngineConfig(output_name="out_sample", profile=EngineProfile.static(2, 16, 16, latent_multiple=2))
    eng = TorchEngine(dense_unet, cfg)
    assert list(eng.run(make_feeds(eng.io_spec, 2, 16, 16))) == ["out_sample"]
    with pytest.raises(Exception, match="outside the engine profile"):
        eng.run(make_feeds(eng.io_spec, 2, 16, 24))


def test_converted_copy_leaves_original_alone(slim_unet):
    half = converted_copy(slim_unet, dtype=torch.float16, fp32_norms=True)
    assert half is not slim_unet
    assert all(p.dtype == torch.float32 for p in slim_unet.parameters())
    assert not any(isinstance(m, Fp32Norm) for m in slim_unet.modules())
    norms = [m for m in half.modules() if isinstance(m, Fp32Norm)]
    assert len(norms) == sum(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in slim_unet.modules())
    assert all(p.dtype == torch.float32 for n in norms for p in n.parameters())
    linears = [m for m in half.modules() if isinstance(m, nn.Linear)]
    assert all(m.weight.dtype == torch.float16 for m in linears)
    assert converted_copy(slim_unet) is slim_unet


def test_fp16_and_channels_last_on_cpu(slim_unet, torch_reference):
    feeds32 = make_feeds(TorchEngine(slim_unet).io_spec, 2, 16, 16, seed=6)
    ref = torch_reference(slim_unet, feeds32)
    cl = TorchEngine(slim_unet, EngineConfig(channels_last=True))
    assert cl.model.unet is not slim_unet
    assert slim_unet.conv_in.weight.is_contiguous()  # caller's layout untouched
    np.testing.assert_allclose(cl.run(feeds32)["latent"], ref, rtol=1e-4, atol=1e-5)
    half = TorchEngine(slim_unet, EngineConfig(dtype="fp16"))
    feeds16 = {k: v.astype(np.float16) if k != "timestep" else v for k, v in feeds32.items()}
    out = half.run(feeds16)["latent"]
    assert out.dtype == np.float16
    assert np.abs(out.astype(np.float32) - ref).max() < 0.05 * np.abs(ref).max()


def test_builds_from_slim_folder(slim_unet, tmp_path, torch_reference):
    from slimexport.slim.apply import save_slim_unet

    save_slim_unet(slim_unet, tmp_path / "slim")
    eng = build_engine("torch", tmp_path / "slim")
    feeds = make_feeds(eng.io_spec, 2, 16, 16)
    np.testing.assert_allclose(eng.run(feeds)["latent"], torch_reference(slim_unet, feeds), rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="torch backend needs"):
        build_engine("torch", tmp_path)


@pytest.mark.gpu
@needs_cuda
def test_cuda_fp16_channels_last_graphs(slim_unet, torch_reference):
    feeds = make_feeds(TorchEngine(slim_unet).io_spec, 2, 16, 16, seed=7)
    feeds16 = {k: v.astype(np.float16) if k != "timestep" else v for k, v in feeds.items()}
    ref = torch_reference(slim_unet, feeds)
    eager = TorchEngine(slim_unet, EngineConfig(device="cuda", dtype="fp16", channels_last=True))
    graphs = TorchEngine(slim_unet, EngineConfig(device="cuda", dtype="fp16", channels_last=True, cuda_graphs=True))
    assert next(slim_unet.parameters()).device.type == "cpu"  # caller's model stays on the CPU
    a, b = eager.run(feeds16)["latent"], graphs.run(feeds16)["latent"]
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-3, atol=1e-3)
    assert np.abs(a.astype(np.float32) - ref).max() < 0.05 * np.abs(ref).max()
    # a second shape captures a second graph; replays see new inputs
    other = {k: v[:1] if k != "sample" else v[:1, :, :8, :8] for k, v in feeds16.items()}
    graphs.run(other)
    feeds16b = dict(feeds16, sample=(feeds16["sample"] * 0.5).astype(np.float16))
    np.testing.assert_allclose(graphs.run(feeds16b)["latent"].astype(np.float32),
                               eager.run(feeds16b)["latent"].astype(np.float32), rtol=1e-3, atol=1e-3)
    assert len(graphs._graphs) == 2
    call = graphs.prepare(feeds16)
    call()
    torch.cuda.synchronize()


def test_exact_fp32_turns_tf32_off_inside_and_restores_it():
    from slimexport.engines.torch_runner import exact_fp32

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with exact_fp32(True):
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        with exact_fp32(False):
            assert torch.backends.cudnn.allow_tf32
        with pytest.raises(RuntimeError), exact_fp32(True):
            raise RuntimeError("inside")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_exact_fp32_follows_the_newer_precision_api_when_the_process_uses_it():
    """Once torch.backends.fp32_precision is set, reading the legacy flags raises: the new ones are used instead."""
    import subprocess
    import sys

    code = """
import torch
from slimexport.engines.torch_runner import exact_fp32
if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
    print("no new api"); raise SystemExit(0)
torch.backends.fp32_precision = "tf32"
before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
with exact_fp32(True):
    assert torch.backends.cuda.matmul.fp32_precision == "ieee" and torch.backends.cudnn.conv.fp32_precision == "ieee"
assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)  # a fresh process: global flags
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() in ("ok", "no new api")


def test_prepare_takes_one_timestep_like_run(slim_unet):
    """A [1] timestep (diffusers' ONNX pipelines, demoDiffusion) is repeated to the batch in the timed path too."""
    eng = build_engine("torch", slim_unet)
    feeds = make_feeds(eng.io_spec, 2, 16, 16, seed=5, one_timestep=True)
    assert feeds["timestep"].shape == (1,)
    full = {**feeds, "timestep": np.repeat(feeds["timestep"], 2)}
    np.testing.assert_array_equal(eng.prepare(feeds)().numpy(), eng.run(full)["latent"])
