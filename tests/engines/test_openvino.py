"""The OpenVINO CPU engine: parity with PyTorch at its pinned precision, profiles, refusals (skipped without openvino)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from slimexport.engines.base import EngineConfig, EngineProfile, build_engine, make_feeds
from slimexport.errors import MissingExtraError, UsageError
from slimexport.verify.metrics import compare

needs_ov = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")
PROFILE = EngineProfile(1, 2, 4, 8, 16, 24, 8, 16, 24, latent_multiple=2)  # tiny: 2 down blocks


def _has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def ov_engine(slim_export):
    eng = build_engine("openvino", slim_export.folder, EngineConfig(profile=PROFILE, threads=1))
    yield eng
    eng.close()


@needs_ov
@pytest.mark.parametrize("batch, height, width", [(2, 16, 16), (3, 24, 8), (1, 8, 24)])
def test_fp32_matches_torch_within_profile(ov_engine, slim_unet, torch_reference, batch, height, width):
    from slimexport.engines.openvino import OvEngine

    assert isinstance(ov_engine, OvEngine) and ov_engine.name == "openvino" and ov_engine.device == "cpu"
    feeds = make_feeds(ov_engine.io_spec, batch, height, width, seed=batch)
    out = ov_engine.run(feeds)
    assert list(out) == ["latent"] and out["latent"].dtype == np.float32
    m = compare(out["latent"], torch_reference(slim_unet, feeds), "fp32")
    assert m["passed"], m["reason"]


@needs_ov
def test_precision_is_pinned_and_reported(ov_engine):
    assert ov_engine.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    info = ov_engine.info()
    assert info["inference_precision"] == "f32" and info["threads"] == 1 and info["streams"] == 1
    assert info["backend"] == "openvino" and info["versions"]["openvino"]
    feeds = make_feeds(ov_engine.io_spec, 2, 16, 16)
    first = ov_engine.run(feeds)["latent"]
    call = ov_engine.prepare(feeds)
    np.testing.assert_allclose(call()["latent"], first, rtol=0, atol=1e-6)
    assert first is not ov_engine.run(feeds)["latent"]  # outputs are copies, not the request's buffer


@needs_ov
def test_refuses_outside_profile_and_bad_feeds(ov_engine):
    with pytest.raises(UsageError, match="outside the engine profile"):
        ov_engine.run(make_feeds(ov_engine.io_spec, 5, 16, 16))
    with pytest.raises(UsageError, match="outside the engine profile"):
        ov_engine.run(make_feeds(ov_engine.io_spec, 2, 32, 16))
    with pytest.raises(UsageError, match="not a multiple of 2"):
        ov_engine.run(make_feeds(ov_engine.io_spec, 2, 9, 16))
    feeds = make_feeds(ov_engine.io_spec, 2, 16, 16)
    with pytest.raises(UsageError, match="sample has dtype float16"):
        ov_engine.run(dict(feeds, sample=feeds["sample"].astype(np.float16)))


@needs_ov
def test_bf16_within_its_tolerance_or_refused(slim_export, slim_unet, torch_reference):
    """bf16 where the CPU computes it (gated by the bf16 tolerance, and not f32 in disguise); refused elsewhere,
    where OpenVINO would silently compute f32."""
    cfg = EngineConfig(profile=PROFILE, dtype="bf16", threads=1)
    from slimexport.engines.openvino import check_cpu_precision

    if not _has_bf16():
        with pytest.raises(UsageError, match="no bf16"):
            check_cpu_precision("bf16")  # up front, before a build's calibration
        with pytest.raises(UsageError, match="no bf16"):
            build_engine("openvino", slim_export.folder, cfg)
        return
    check_cpu_precision("bf16")
    eng = build_engine("openvino", slim_export.folder, cfg)
    assert eng.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"
    assert eng.info()["inference_precision"] == "bf16" and eng.io_spec["inputs"][0]["dtype"] == "float32"
    feeds = make_feeds(eng.io_spec, 4, 24, 24, seed=3)
    out = eng.run(feeds)["latent"]
    assert out.dtype == np.float32
    ref = torch_reference(slim_unet, feeds)
    m = compare(out, ref, "bf16")
    assert m["passed"], m["reason"]
    assert not compare(out, ref, "fp32")["passed"]  # bf16 rounding shows: the hint took
    eng.close()


@needs_ov
def test_fp16_export_computes_f32_within_fp16_tolerance(slim_export_fp16, slim_unet, torch_reference):
    eng = build_engine("openvino", slim_export_fp16.folder, EngineConfig(dtype="fp16", threads=1))
    assert eng.info()["inference_precision"] == "f32"
    feeds = make_feeds(eng.io_spec, 2, 16, 16)
    out = eng.run(feeds)["latent"]
    assert out.dtype == np.float16
    ref = torch_reference(slim_unet, {k: v.astype(np.float32) for k, v in feeds.items()})
    m = compare(out, ref, "fp16")
    assert m["passed"], m["reason"]
    with pytest.raises(UsageError, match="fp32 export"):
        build_engine("openvino", slim_export_fp16.folder, EngineConfig(dtype="bf16"))


@needs_ov
def test_model_cache_is_written_and_survives_a_damaged_blob(dense_export, tmp_path):
    cfg = EngineConfig(profile=PROFILE, threads=1, cache_dir=str(tmp_path / "ov"))
    feeds = make_feeds(dense_export.io_spec, 2, 16, 16)
    first = build_engine("openvino", dense_export.folder, cfg)
    want = first.run(feeds)["latent"]
    first.close()
    blobs = list((tmp_path / "ov").glob("*.blob"))
    assert blobs
    for b in blobs:
        b.write_bytes(b.read_bytes()[:100])  # a blob cut short (say, a write interrupted)
    again = build_engine("openvino", dense_export.folder, cfg)
    np.testing.assert_allclose(again.run(feeds)["latent"], want, rtol=0, atol=1e-5)
    again.close()


@needs_ov
def test_cuda_refused(dense_export):
    with pytest.raises(UsageError, match="CPU only"):
        build_engine("openvino", dense_export.folder, EngineConfig(device="cuda"))


@pytest.mark.parametrize("backend", ["onnxruntime", "torch", "tensorrt", "aoti", "torch-compile"])
def test_bf16_refused_on_other_backends(backend):
    with pytest.raises(UsageError, match="openvino"):
        build_engine(backend, "unused", EngineConfig(dtype="bf16"))


def test_build_config_refuses_bf16_and_cuda_beside_openvino():
    from slimexport.config import BuildConfig, ExportConfig

    with pytest.raises(UsageError, match="openvino"):
        BuildConfig(backend="onnxruntime", export=ExportConfig(dtype="bf16"))
    with pytest.raises(UsageError, match="OpenVINO runs on the CPU"):
        BuildConfig(backend="openvino", engine_device="cuda")
    assert BuildConfig(backend="openvino", export=ExportConfig(dtype="bf16")).export.dtype == "bf16"


def test_cli_bf16_on_another_backend_is_one_line(capsys):
    from slimexport.cli.main import main

    assert main(["build", "--model", "tiny", "--backend", "onnxruntime", "--dtype", "bf16", "--dump-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "openvino" in err and "--backend" in err


def test_missing_openvino_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(MissingExtraError, match=r"slimexport\[openvino\]"):
        build_engine("openvino", tmp_path)


def test_precision_hint_rule():
    from slimexport.engines.openvino import check_cpu_precision, precision_hint

    check_cpu_precision("fp32")  # nothing to check, openvino or not

    assert precision_hint("fp32", "float32") == "f32"
    assert precision_hint("bf16", "float32") == "bf16"
    assert precision_hint("fp16", "float16") == precision_hint("fp32", "float16") == "f32"
    with pytest.raises(UsageError, match="fp32 export"):
        precision_hint("bf16", "float16")
