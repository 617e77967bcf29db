from __future__ import annotations

import numpy as np
import pytest

from slimexport.engines.base import EngineConfig, EngineProfile, build_engine, make_feeds
from slimexport.engines.onnxruntime import (
    CPU_EP,
    CUDA_EP,
    TRT_EP,
    OrtEngine,
    choose_providers,
    io_spec_from_model,
)
from slimexport.errors import ArtifactError, MissingExtraError, UsageError


def test_runs_and_matches_torch(slim_export, slim_unet, torch_reference):
    eng = build_engine("onnxruntime", slim_export.folder, EngineConfig(threads=1))
    assert isinstance(eng, OrtEngine) and eng.name == "onnxruntime" and eng.device == "cpu"
    feeds = make_feeds(eng.io_spec, 3, 24, 32, seed=2)
    out = eng.run(feeds)
    assert list(out) == ["latent"]
    ref = torch_reference(slim_unet, feeds)
    assert np.abs(out["latent"] - ref).max() <= 1e-5 * np.abs(ref).max()
    info = eng.info()
    assert info["threads"] == 1 and info["providers"] == [CPU_EP] and info["versions"]["onnxruntime"]
    call = eng.prepare(feeds)
    np.testing.assert_array_equal(call()["latent"], out["latent"])
    eng.close()


def test_refuses_bad_feeds_and_outside_profile(dense_export):
    eng = OrtEngine(dense_export.onnx_path, EngineConfig(profile=EngineProfile(1, 2, 2, 8, 16, 16, 8, 16, 16, latent_multiple=2)))
    feeds = make_feeds(eng.io_spec, 2, 16, 16)
    eng.run(feeds)
    with pytest.raises(UsageError, match="outside the engine profile"):
        eng.run(make_feeds(eng.io_spec, 4, 16, 16))
    bad = dict(feeds, timestep=feeds["timestep"].astype(np.float16))
    with pytest.raises(UsageError, match="timestep has dtype float16"):
        eng.run(bad)


def test_io_spec_without_record_matches(dense_export, tmp_path):
    import shutil

    folder = tmp_path / "bare"
    shutil.copytree(dense_export.folder, folder)
    (folder / "export.json").unlink()
    spec = io_spec_from_model(folder / "model.onnx")
    assert spec == dense_export.io_spec
    eng = OrtEngine(folder)
    assert eng.run(make_feeds(spec, 1, 8, 8))["latent"].shape == (1, 4, 8, 8)


def test_missing_model(tmp_path):
    with pytest.raises(ArtifactError, match="missing"):
        OrtEngine(tmp_path)


def test_choose_providers():
    assert choose_providers("cpu", None, [CPU_EP]) == [CPU_EP]
    assert choose_providers("cuda", None, [CUDA_EP, CPU_EP]) == [CUDA_EP, CPU_EP]
    assert choose_providers("cuda:1", (TRT_EP, CUDA_EP), [TRT_EP, CUDA_EP, CPU_EP]) == [TRT_EP, CUDA_EP, CPU_EP]
    with pytest.raises(MissingExtraError, match="slimexport\\[gpu\\]"):
        choose_providers("cuda", None, [CPU_EP])
    with pytest.raises(UsageError, match="OpenVINO"):
        choose_providers("cpu", ("OpenVINOExecutionProvider",), [CPU_EP])


def test_fp16_engine_runs_on_cpu(slim_export_fp16, slim_unet, torch_reference):
    from slimexport.verify.metrics import compare

    eng = OrtEngine(slim_export_fp16.folder)
    assert eng.device == "cpu" and eng.info()["providers"] == [CPU_EP]
    feeds = make_feeds(eng.io_spec, 2, 16, 16)
    assert feeds["sample"].dtype == np.float16 and feeds["encoder_hidden_states"].dtype == np.float16
    out = eng.run(feeds)["latent"]
    assert out.dtype == np.float16 and out.shape == (2, 4, 16, 16) and np.isfinite(out).all()
    # the fp16 engine against the fp32 PyTorch model on the same (fp16-valued) inputs, under the fp16 gate
    ref = torch_reference(slim_unet, feeds)
    m = compare(out, ref, "fp16")
    assert m["passed"], m["reason"]
    assert 0 < m["max_abs"] and m["cosine"] > 0.999
    # the gate tells a different output apart: the reference of the other sample in the batch
    assert not compare(out[::-1].copy(), ref, "fp16")["passed"]
    np.testing.assert_array_equal(eng.prepare(feeds)()["latent"], out)
    eng.close()


def test_engine_takes_one_timestep_in_either_dtype(slim_export_fp16, slim_unet, torch_reference):
    """The fp16 engine takes timestep [1] or [2B], float32 or float16 (the sample's dtype), as diffusers' ONNX
    pipelines and the TensorRT demo pass it, and gives the same output for the same timestep value."""
    from slimexport.verify.metrics import compare

    eng = OrtEngine(slim_export_fp16.folder)
    feeds = make_feeds(eng.io_spec, 3, 16, 16, seed=8)
    per_row = eng.run(dict(feeds, timestep=np.full(3, 501.0, np.float32)))["latent"]
    ref = torch_reference(slim_unet, dict(feeds, timestep=np.full(3, 501.0, np.float32)))
    assert compare(per_row, ref, "fp16")["passed"]
    for ts in (np.array([501.0], np.float32), np.array([501.0], np.float16), np.full(3, 501.0, np.float16)):
        out = eng.run(dict(feeds, timestep=ts))["latent"]
        assert compare(out, per_row, "fp16")["passed"], ts
    with pytest.raises(UsageError, match=r"or \[2B\] = \[3\]"):
        eng.run(dict(feeds, timestep=np.zeros(2, np.float32)))
    eng.close()

