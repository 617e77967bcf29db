from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from slimexport.engines import tensorrt as trtmod
from slimexport.engines.base import EngineConfig, EngineProfile, build_engine, make_feeds, unet_io_spec
from slimexport.engines.tensorrt import (
    DeviceInfo,
    check_compatible,
    engine_filename,
    incompatibilities,
    profile_shapes,
    reusable,
    sidecar_path,
    sm_tag,
    timing_cache_filename,
    timing_cache_key,
    trt_tag,
)
from slimexport.errors import IncompatibleArtifactError, MissingExtraError, UsageError

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", "10.8.0.43")
SPEC = unet_io_spec(dtype="fp16", output_name="latent", in_channels=4, out_channels=4, seq_len=77, context_dim=768)


def test_names():
    assert sm_tag("9.0") == sm_tag((9, 0)) == "sm90"
    assert sm_tag("8.6") == "sm86"
    assert trt_tag("10.8.0.43") == "trt10.8.0"
    assert trt_tag("11.0") == "trt11.0"
    assert engine_filename("9.0", "10.8.0.43") == "unet.sm90.trt10.8.0.plan"
    assert engine_filename((8, 9), "10.3.0", stem="slim") == "slim.sm89.trt10.3.0.plan"
    assert sidecar_path("/x/unet.sm90.trt10.8.0.plan").name == "unet.sm90.trt10.8.0.json"
    with pytest.raises(UsageError):
        sm_tag("sm90")
    with pytest.raises(UsageError):
        trt_tag("ten")


def test_timing_cache_key():
    assert timing_cache_key(H100.gpu_name, H100.compute_capability, H100.trt_version) == "nvidia-h100-80gb-hbm3.sm90.trt10.8.0"
    assert timing_cache_filename(H100) == "timing.nvidia-h100-80gb-hbm3.sm90.trt10.8.0.cache"
    other = DeviceInfo("NVIDIA A100-SXM4-80GB", "8.0", "10.8.0.43")
    assert timing_cache_filename(other) != timing_cache_filename(H100)
    newer = DeviceInfo(H100.gpu_name, "9.0", "10.9.0.34")
    assert timing_cache_filename(newer) != timing_cache_filename(H100)


def test_compatibility_refusal_says_what_differs():
    built = {**H100.to_dict()}
    check_compatible(built, H100)
    assert incompatibilities(built, H100) == []
    a100 = DeviceInfo("NVIDIA A100-SXM4-80GB", "8.0", "10.8.0.43")
    with pytest.raises(IncompatibleArtifactError) as info:
        check_compatible(built, a100, "unet.sm90.trt10.8.0.plan")
    msg = str(info.value)
    assert "compute capability 9.0 vs 8.0 here" in msg and "A100" in msg and "TensorRT 10" not in msg
    assert "rebuild" in msg and "\n" not in msg
    with pytest.raises(IncompatibleArtifactError, match="TensorRT 10.8.0.43 vs 10.9.0.34 here"):
        check_compatible(built, DeviceInfo(H100.gpu_name, "9.0", "10.9.0.34"))
    with pytest.raises(IncompatibleArtifactError, match="GPU 'NVIDIA H100 80GB HBM3' vs 'NVIDIA H100 PCIe' here"):
        check_compatible(built, DeviceInfo("NVIDIA H100 PCIe", "9.0", "10.8.0.43"))


def test_profile_shapes():
    p = EngineProfile(1, 2, 4, 32, 64, 96, 32, 64, 128)
    shapes = profile_shapes(p, SPEC)
    assert shapes["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (4, 4, 96, 128))
    assert shapes["timestep"] == ((1,), (2,), (4,))
    assert shapes["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (4, 77, 768))
    bad = {"inputs": [{"name": "x", "dtype": "float16", "shape": ["S", 4]}]}
    with pytest.raises(UsageError, match="dynamic axis 'S'"):
        profile_shapes(p, bad)


def test_reusable():
    p = EngineProfile.static(2, 64, 64)
    side = {"format": trtmod.SIDECAR_FORMAT, **H100.to_dict(), "onnx_sha256": "abc", "profile": p.to_dict(),
            "optimization_level": 3}
    assert reusable(side, onnx_sha256="abc", profile=p, optimization_level=3, here=H100)
    assert not reusable(side, onnx_sha256="abd", profile=p, optimization_level=3, here=H100)
    assert not reusable(side, onnx_sha256="abc", profile=EngineProfile.static(4, 64, 64), optimization_level=3, here=H100)
    assert not reusable(side, onnx_sha256="abc", profile=p, optimization_level=5, here=H100)
    assert not reusable(side, onnx_sha256="abc", profile=p, optimization_level=3, here=DeviceInfo("x", "8.0", "10.8.0.43"))


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed")
def test_clear_error_without_tensorrt(dense_export, tmp_path):
    with pytest.raises(MissingExtraError) as info:
        build_engine("tensorrt", dense_export.folder, EngineConfig(device="cuda", profile=EngineProfile.static(2, 16, 16, 2)))
    msg = str(info.value)
    assert "--backend tensorrt needs the optional package 'tensorrt'" in msg and "pip install 'slimexport[trt]'" in msg
    with pytest.raises(MissingExtraError):
        trtmod.build_trt_engine(dense_export.onnx_path, tmp_path, EngineProfile.static(2, 16, 16, 2))
    with pytest.raises(MissingExtraError):
        trtmod.TrtEngine(tmp_path / "unet.sm90.trt10.8.0.plan")


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT")
def test_build_run_and_reuse(slim_export_fp16, slim_unet, torch_reference, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from slimexport.verify.metrics import compare

    profile = EngineProfile(1, 2, 4, 8, 16, 32, 8, 16, 32, latent_multiple=2)
    res = trtmod.build_trt_engine(slim_export_fp16.folder, tmp_path, profile)
    assert res.plan.name.startswith("unet.sm") and not res.reused
    again = trtmod.build_trt_engine(slim_export_fp16.folder, tmp_path, profile)
    assert again.reused
    with trtmod.TrtEngine(res.plan, EngineConfig(device="cuda")) as eng:
        feeds = make_feeds(eng.io_spec, 2, 16, 16)
        out = eng.run(feeds)["latent"]
        assert compare(out, torch_reference(slim_unet, feeds), "fp16")["passed"]
        with pytest.raises(UsageError, match="outside the engine profile"):
            eng.run(make_feeds(eng.io_spec, 8, 16, 16))
    assert np.isfinite(out).all()
