from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from slimexport.engines.base import (
    Engine,
    EngineConfig,
    EngineProfile,
    build_engine,
    check_feeds,
    conform_feeds,
    make_feeds,
    unet_io_spec,
)
from slimexport.errors import ConfigError, UsageError

SPEC = unet_io_spec(dtype="fp32", output_name="latent", in_channels=4, out_channels=4, seq_len=77, context_dim=32)
# what the ONNX export records: the timestep on an axis of its own (1 or 2B)
EXPORTED = unet_io_spec(dtype="fp32", output_name="latent", in_channels=4, out_channels=4, seq_len=77, context_dim=32,
                        broadcast_timestep=True)
EXPORTED16 = unet_io_spec(dtype="fp16", output_name="latent", in_channels=4, out_channels=4, seq_len=77, context_dim=32,
                          broadcast_timestep=True)


def test_io_spec_shapes_and_axes():
    names = [e["name"] for e in SPEC["inputs"]]
    assert names == ["sample", "timestep", "encoder_hidden_states"]
    assert SPEC["inputs"][1] == {"name": "timestep", "dtype": "float32", "shape": ["2B"]}
    assert SPEC["dynamic_axes"]["encoder_hidden_states"] == {"2B": 0}
    fp16 = unet_io_spec(dtype="fp16", output_name="out_sample", in_channels=4, out_channels=4, seq_len=77, context_dim=768)
    assert [e["dtype"] for e in fp16["inputs"]] == ["float16", "float32", "float16"]
    assert fp16["outputs"][0]["name"] == "out_sample"
    with pytest.raises(UsageError):
        unet_io_spec(dtype="int8", output_name="latent", in_channels=4, out_channels=4, seq_len=77, context_dim=8)


def test_io_spec_timestep_axis_of_its_own():
    assert EXPORTED["inputs"][1] == {"name": "timestep", "dtype": "float32", "shape": ["Bt"], "sizes": {"Bt": [1, "2B"]}}
    assert EXPORTED["dynamic_axes"]["timestep"] == {"Bt": 0} and EXPORTED["dynamic_axes"]["sample"]["2B"] == 0
    assert EXPORTED16["inputs"][1]["dtype"] == "float32"
    same = unet_io_spec(dtype="fp16", output_name="latent", in_channels=4, out_channels=4, seq_len=77, context_dim=32,
                        broadcast_timestep=True, timestep_dtype="sample")
    assert same["inputs"][1]["dtype"] == "float16"
    with pytest.raises(UsageError, match="timestep_dtype='float64'"):
        unet_io_spec(dtype="fp16", output_name="latent", in_channels=4, out_channels=4, seq_len=77, context_dim=32,
                     timestep_dtype="float64")


def test_make_feeds_is_seeded_and_typed():
    a, b = make_feeds(SPEC, 3, 8, 16, seed=1), make_feeds(SPEC, 3, 8, 16, seed=1)
    assert {k: v.shape for k, v in a.items()} == {"sample": (3, 4, 8, 16), "timestep": (3,), "encoder_hidden_states": (3, 77, 32)}
    assert all(v.dtype == np.float32 for v in a.values())
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert ((a["timestep"] >= 0) & (a["timestep"] < 1000)).all()
    for spec in (SPEC, EXPORTED):
        assert make_feeds(spec, 3, 8, 8)["timestep"].shape == (3,)
        one = make_feeds(spec, 3, 8, 8, one_timestep=True)
        assert one["timestep"].shape == (1,) and one["sample"].shape == (3, 4, 8, 8)


@pytest.mark.parametrize("spec", [SPEC, EXPORTED, EXPORTED16], ids=["2B", "Bt", "Bt-fp16"])
@pytest.mark.parametrize("rows", [1, 3])
def test_one_or_per_row_timesteps_are_accepted(spec, rows):
    """[1] (diffusers' ONNX pipelines, the TensorRT demo) and [2B]; in float32 or the sample's dtype."""
    feeds = make_feeds(spec, 3, 8, 8)
    act = feeds["sample"].dtype
    for dtype in {np.dtype(np.float32), act}:
        ts = np.full(rows, 500.0, dtype)
        check_feeds(spec, dict(feeds, timestep=ts))
        got = conform_feeds(spec, dict(feeds, timestep=ts))["timestep"]
        want_rows = 3 if spec is SPEC else rows  # a graph tying the timestep to 2B gets it repeated
        assert got.dtype == np.float32 and got.shape == (want_rows,) and (got == 500).all()


def test_conform_keeps_the_declared_timestep_dtype():
    spec = unet_io_spec(dtype="fp16", output_name="latent", in_channels=4, out_channels=4, seq_len=77, context_dim=32,
                        broadcast_timestep=True, timestep_dtype="sample")
    feeds = make_feeds(spec, 2, 8, 8)
    assert feeds["timestep"].dtype == np.float16
    check_feeds(spec, dict(feeds, timestep=np.array([999.0], np.float32)))
    assert conform_feeds(spec, dict(feeds, timestep=np.array([999.0], np.float32)))["timestep"].dtype == np.float16


def test_engine_runs_on_conformed_feeds():
    class Recorder(Engine):
        io_spec = SPEC

        def _run(self, feeds):
            self.fed = feeds
            return {"latent": feeds["sample"]}

    eng = Recorder()
    feeds = make_feeds(SPEC, 4, 8, 8, one_timestep=True)
    eng.run(feeds)
    assert eng.fed["timestep"].shape == (4,) and (eng.fed["timestep"] == feeds["timestep"][0]).all()
    eng.prepare(feeds)()
    assert eng.fed["timestep"].shape == (4,)


@pytest.mark.parametrize("change, match", [
    (lambda f: f.pop("timestep"), "timestep"),
    (lambda f: f.update(extra=np.zeros(1, np.float32)), "extra"),
    (lambda f: f.update(timestep=f["timestep"].astype(np.int64)), "dtype int64"),
    (lambda f: f.update(sample=f["sample"][0]), "rank"),
    (lambda f: f.update(timestep=np.zeros(5, np.float32)), r"\[1\] \(one timestep for every row\) or \[2B\] = \[2\]"),
    (lambda f: f.update(timestep=np.zeros((2, 1), np.float32)), r"timestep has shape \[2, 1\]"),
    (lambda f: f.update(timestep=np.zeros(2, np.float16)), "timestep has dtype float16, the engine takes float32"),
    (lambda f: f.update(encoder_hidden_states=np.zeros((2, 76, 32), np.float32)), "77"),
])
@pytest.mark.parametrize("spec", [SPEC, EXPORTED], ids=["2B", "Bt"])
def test_check_feeds_refuses(change, match, spec):
    feeds = make_feeds(spec, 2, 8, 8)
    change(feeds)
    with pytest.raises(UsageError, match=match) as info:
        check_feeds(spec, feeds)
    assert "\n" not in str(info.value)


def test_profile_validation():
    p = EngineProfile(1, 2, 4, 32, 64, 96, 32, 64, 128)
    assert p.max_width == 128
    with pytest.raises(ConfigError, match="opt_batch"):
        EngineProfile(min_batch=4, opt_batch=2, max_batch=8)
    with pytest.raises(ConfigError, match="multiple of latent_multiple=8"):
        EngineProfile(min_height=30)
    with pytest.raises(ConfigError, match="max_width"):
        EngineProfile(max_width=0)
    with pytest.raises(ConfigError):
        EngineProfile(opt_batch=2.5)
    with pytest.raises(AttributeError):
        p.max_batch = 3  # frozen


def test_profile_round_trip_and_constructors():
    p = EngineProfile.from_pixels(batch=(1, 1, 2), height=(256, 512, 768), width=(256, 512, 1024))
    assert (p.min_batch, p.opt_batch, p.max_batch) == (2, 2, 4)  # two UNet rows per prompt with CFG
    assert (p.min_height, p.opt_height, p.max_height) == (32, 64, 96)
    assert (p.min_width, p.max_width) == (32, 128)
    assert EngineProfile.from_dict(p.to_dict()) == p
    s = EngineProfile.static(2, 64, 64)
    assert s.min_batch == s.max_batch == 2 and s.min_width == s.max_width == 64
    with pytest.raises(UsageError, match="VAE scale factor"):
        EngineProfile.from_pixels(batch=(1, 1, 1), height=(500, 512, 512), width=(512, 512, 512))


def test_profile_refuses_outside_shapes_in_one_line():
    p = EngineProfile(1, 2, 4, 32, 64, 96, 32, 64, 96)
    p.check(2, 64, 64)
    p.check(4, 96, 32)
    with pytest.raises(UsageError) as info:
        p.check(6, 104, 64)
    msg = str(info.value)
    assert "batch 6 > max 4" in msg and "height 104 > max 96" in msg and "\n" not in msg
    with pytest.raises(UsageError, match="width 24 < min 32"):
        p.check(2, 64, 24)
    with pytest.raises(UsageError, match="not a multiple of 8"):
        p.check(2, 60, 64)


def test_engine_config_validation_and_round_trip():
    cfg = EngineConfig(device="cuda:1", threads=2, profile=EngineProfile.static(2, 64, 64), providers=["CUDAExecutionProvider"])
    assert cfg.providers == ("CUDAExecutionProvider",)
    assert EngineConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ({"device": "tpu"}, {"threads": 0}, {"dtype": "int8"}, {"optimization_level": 7},
                {"cuda_graphs": True}, {"output_name": "x"}):
        with pytest.raises(ConfigError):
            EngineConfig(**bad)
    with pytest.raises(UsageError, match="no field"):
        EngineConfig.from_dict({"devise": "cpu"})


def test_build_engine_unknown_backend():
    with pytest.raises(UsageError, match="unknown backend 'ncnn'"):
        build_engine("ncnn", "x")


def test_lean_imports():
    code = (
        "import sys, slimexport, slimexport.engines, slimexport.engines.base, slimexport.verify, slimexport.bench\n"
        "import slimexport.engines.tensorrt, slimexport.engines.onnxruntime, slimexport.engines.openvino\n"
        "import slimexport.verify.metrics\n"
        "heavy = [m for m in ('onnxruntime', 'tensorrt', 'triton', 'openvino') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import slimexport.engines.base as b\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    code2 = (
        "import sys, slimexport.engines, slimexport.verify, slimexport.bench, slimexport.engines.base\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt', 'diffusers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code2], check=True)
