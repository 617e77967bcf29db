from __future__ import annotations

import contextlib
import importlib.util
import shutil
import sys
import types

import numpy as np
import pytest

from slimexport.artifacts import read_json, sha256_file, write_json
from slimexport.engines import tensorrt as trtmod
from slimexport.engines.base import EngineConfig, EngineProfile, build_engine, make_feeds, unet_io_spec
from slimexport.engines.onnx_export import DATA_FILE, MODEL_FILE, RESULT_FILE
from slimexport.engines.tensorrt import (
    DeviceInfo,
    check_compatible,
    cuda_index,
    engine_filename,
    external_data_sha256,
    incompatibilities,
    profile_shapes,
    reusable,
    sidecar_path,
    sm_tag,
    timing_cache_filename,
    timing_cache_key,
    trt_tag,
)
from slimexport.errors import ArtifactError, IncompatibleArtifactError, MissingExtraError, UsageError

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
H100 = DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", "10.8.0.43")
SPEC = unet_io_spec(dtype="fp16", output_name="latent", in_channels=4, out_channels=4, seq_len=77, context_dim=768,
                    broadcast_timestep=True)  # as the ONNX export records it


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
    p = EngineProfile(2, 2, 4, 32, 64, 96, 32, 64, 128)
    shapes = profile_shapes(p, SPEC)
    assert shapes["sample"] == ((2, 4, 32, 32), (2, 4, 64, 64), (4, 4, 96, 128))
    assert shapes["timestep"] == ((1,), (2,), (4,))  # its own axis: [1] and every [2B] fit one engine
    assert shapes["encoder_hidden_states"] == ((2, 77, 768), (2, 77, 768), (4, 77, 768))
    tied = unet_io_spec(dtype="fp16", output_name="latent", in_channels=4, out_channels=4, seq_len=77, context_dim=768)
    assert profile_shapes(p, tied)["timestep"] == ((2,), (2,), (4,))  # exports from before the timestep had its own axis
    bad = {"inputs": [{"name": "x", "dtype": "float16", "shape": ["S", 4]}]}
    with pytest.raises(UsageError, match="dynamic axis 'S'"):
        profile_shapes(p, bad)


def test_profile_shapes_of_a_step_cache_pair(tiny):
    """The shallow graph's ``cache`` input: its Hc/Wc axes are the latent size over the pair's scale, rounded up."""
    from slimexport.stepcache.export import pair_io_specs

    p = EngineProfile(2, 2, 4, 32, 64, 96, 32, 64, 128)
    _, shallow = pair_io_specs(tiny.unet, 2)  # tiny: two levels, depth 2 skips only the mid block (scale 2)
    cache = next(e for e in shallow["inputs"] if e["name"] == "cache")
    assert cache["scale"] == 2 and cache["shape"][2:] == ["Hc", "Wc"]
    shapes = profile_shapes(p, shallow)
    assert shapes["cache"] == ((2, cache["shape"][1], 16, 16), (2, cache["shape"][1], 32, 32), (4, cache["shape"][1], 48, 64))
    assert shapes["sample"] == ((2, 4, 32, 32), (2, 4, 64, 64), (4, 4, 96, 128))


def test_reusable():
    p = EngineProfile.static(2, 64, 64)
    data = {DATA_FILE: "def"}
    side = {"format": trtmod.SIDECAR_FORMAT, **H100.to_dict(), "onnx_sha256": "abc", "data_sha256": data,
            "profile": p.to_dict(), "optimization_level": 3}
    kw = {"onnx_sha256": "abc", "data_sha256": data, "profile": p, "optimization_level": 3, "here": H100}
    assert reusable(side, **kw)
    assert not reusable(side, **{**kw, "onnx_sha256": "abd"})
    assert not reusable(side, **{**kw, "data_sha256": {DATA_FILE: "deg"}})  # same graph, other weights
    assert not reusable(side, **{**kw, "profile": EngineProfile.static(4, 64, 64)})
    assert not reusable(side, **{**kw, "optimization_level": 5})
    assert not reusable(side, **{**kw, "here": DeviceInfo("x", "8.0", "10.8.0.43")})
    old = {k: v for k, v in side.items() if k != "data_sha256"}  # written before weights were hashed
    assert not reusable(old, **kw)
    assert not reusable(old, **{**kw, "data_sha256": {}})


def test_external_data_sha256(dense_export, tmp_path):
    assert external_data_sha256(dense_export.onnx_path) == {DATA_FILE: dense_export.data_sha256}
    shutil.copy(dense_export.onnx_path, tmp_path / MODEL_FILE)
    with pytest.raises(ArtifactError, match="model.onnx_data, the weights model.onnx references, is missing"):
        external_data_sha256(tmp_path / MODEL_FILE)


def test_cuda_index():
    assert cuda_index("cuda:1") == 1 and cuda_index("cuda") == 0 and cuda_index("cpu") == 0
    with pytest.raises(UsageError):
        cuda_index("cuda:x")


def test_narrow_profile():
    def narrow(asked, built):
        return asked.narrowed_to(built, "TensorRT engine", "rebuild with --batch/--height/--width MIN,OPT,MAX")

    built = EngineProfile(1, 2, 4, 8, 16, 32, 8, 16, 32, latent_multiple=2)
    assert narrow(built, built) == built
    wide = EngineProfile(1, 2, 8, 8, 16, 64, 8, 16, 64, latent_multiple=2)
    assert narrow(wide, built) == built
    inner = EngineProfile(2, 2, 2, 16, 16, 24, 16, 16, 16, latent_multiple=2)
    assert narrow(inner, built) == inner
    # a coarser multiple keeps the sizes both allow
    assert narrow(EngineProfile(1, 8, 8, 8, 64, 64, 8, 64, 64, latent_multiple=8), built) == \
        EngineProfile(1, 4, 4, 8, 32, 32, 8, 32, 32, latent_multiple=8)
    with pytest.raises(UsageError, match=r"built for batch 1\.\.4, the profile asks for 8\.\.16") as info:
        narrow(EngineProfile(8, 8, 16, 8, 16, 32, 8, 16, 32, latent_multiple=2), built)
    assert "--batch/--height/--width MIN,OPT,MAX" in str(info.value) and "\n" not in str(info.value)
    # ranges that overlap but share no size on both multiples: the error names the multiples
    with pytest.raises(UsageError, match=r"height 8\.\.10 \(multiples of 2\), the profile asks for 9\.\.15 \(multiples of 3\)"):
        narrow(EngineProfile(1, 2, 4, 9, 12, 15, 9, 12, 15, latent_multiple=3),
               EngineProfile(1, 2, 4, 8, 8, 10, 8, 8, 10, latent_multiple=2))


# ---------------------------------------------------------------- fakes for TensorRT and the GPU


class FakeNetwork:
    """What ``network_from_onnx_path`` returns (builder, network, parser): here an object whose release a test can see."""

    def __init__(self, head: bytes):
        self.head = head


class FakeHostMemory(bytearray):
    """TensorRT's ``IHostMemory``: a buffer; ``bytes(...)`` of it would copy the whole plan."""

    def __bytes__(self):
        raise AssertionError("the plan was copied with bytes()")


@pytest.fixture
def fake_gpu(monkeypatch):
    """TensorRT, the GPU and Polygraphy's TensorRT calls faked: returns the list of CUDA devices made current
    (the innermost last), a log of what ran on which device, and ``fake``: the last CreateConfig arguments
    (``config``), the last inference's feeds (``feeds``) and the runner class (``runner_class``)."""
    import polygraphy.backend.trt as ptrt
    import torch
    from polygraphy import util

    current, ran = [], []
    fake = types.SimpleNamespace(config=None, feeds=None)

    @contextlib.contextmanager
    def device(index):
        current.append(index)
        try:
            yield
        finally:
            current.pop()

    def network_from_onnx_path(path, strongly_typed):
        return FakeNetwork(open(path, "rb").read()[:16])

    def engine_bytes_from_network(network, config, save_timing_cache):
        ran.append(("build", current[-1] if current else None))
        # as Polygraphy does: lock the cache (a path gets a .lock file beside it), write it, fsync
        with util.LockFile(save_timing_cache):
            util.save_file(b"cache after build " + str(len(ran)).encode(), save_timing_cache)
        return FakeHostMemory(b"plan:" + network.head)

    def create_config(**kw):
        fake.config = kw
        return kw

    class FakeProfile(dict):
        def add(self, name, min, opt, max):
            self[name] = (min, opt, max)

    class FakeRunner:
        """Like Polygraphy's TrtRunner: outputs are views of one host buffer reused by every call."""

        def __init__(self, engine, name=None):
            self.is_active, self.calls, self.host = False, 0, np.zeros(1 << 16, np.float16)

        def activate(self):
            ran.append(("activate", current[-1] if current else None))
            self.is_active = True

        def deactivate(self):
            ran.append(("deactivate", current[-1] if current else None))
            self.is_active = False

        def infer(self, feeds, check_inputs=True, copy_outputs_to_host=True):
            ran.append(("infer", current[-1] if current else None))
            fake.feeds = feeds
            self.calls += 1
            n, _, h, w = feeds["sample"].shape
            out = self.host[: n * 4 * h * w].reshape(n, 4, h, w)
            out[:] = self.calls
            return {"latent": out}

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(trtmod, "_require_trt", lambda: types.SimpleNamespace(__name__="tensorrt", __version__=H100.trt_version))
    monkeypatch.setattr(trtmod, "current_device_info", lambda device="cuda:0": H100)
    monkeypatch.setattr(ptrt, "network_from_onnx_path", network_from_onnx_path)
    monkeypatch.setattr(ptrt, "engine_bytes_from_network", engine_bytes_from_network)
    monkeypatch.setattr(ptrt, "CreateConfig", create_config)
    monkeypatch.setattr(ptrt, "Profile", FakeProfile)
    monkeypatch.setattr(ptrt, "TrtRunner", FakeRunner)
    monkeypatch.setattr(ptrt, "engine_from_bytes", lambda data: data)
    fake.runner_class = FakeRunner
    return current, ran, fake


def _copy_export(export, dst):
    dst.mkdir()
    for name in (MODEL_FILE, DATA_FILE, RESULT_FILE):
        shutil.copy(export.folder / name, dst / name)
    return dst


def test_reuse_needs_the_same_weights(fake_gpu, dense_export, tmp_path):
    _, ran, _ = fake_gpu
    folder = _copy_export(dense_export, tmp_path / "export")
    profile = EngineProfile.static(2, 16, 16, 2)
    res = trtmod.build_trt_engine(folder, tmp_path / "engines", profile)
    assert not res.reused and res.sidecar["data_sha256"] == {DATA_FILE: dense_export.data_sha256}
    assert trtmod.build_trt_engine(folder, tmp_path / "engines", profile).reused
    # same architecture, other weights: model.onnx is unchanged, model.onnx_data is not
    data = bytearray((folder / DATA_FILE).read_bytes())
    data[:4] = bytes(b ^ 0xFF for b in data[:4])
    (folder / DATA_FILE).write_bytes(bytes(data))
    assert sha256_file(folder / MODEL_FILE) == dense_export.onnx_sha256
    again = trtmod.build_trt_engine(folder, tmp_path / "engines", profile)
    assert not again.reused and again.sidecar["data_sha256"] == {DATA_FILE: sha256_file(folder / DATA_FILE)}
    assert trtmod.build_trt_engine(folder, tmp_path / "engines", profile).reused
    # a sidecar from before weights were hashed is never trusted
    side = trtmod.sidecar_path(again.plan)
    write_json(side, {k: v for k, v in read_json(side).items() if k != "data_sha256"})
    assert not trtmod.build_trt_engine(folder, tmp_path / "engines", profile).reused
    assert [r for r in ran if r[0] == "build"] == [("build", 0)] * 3


def _fake_plan(tmp_path, profile):
    plan = tmp_path / engine_filename(H100.compute_capability, H100.trt_version)
    plan.write_bytes(b"fake plan")
    write_json(sidecar_path(plan), {"format": trtmod.SIDECAR_FORMAT, **H100.to_dict(), "plan_sha256": sha256_file(plan),
                                    "profile": profile.to_dict(), "io_spec": SPEC})
    return plan


def test_engine_on_the_configured_device(fake_gpu, dense_export, tmp_path):
    current, ran, _ = fake_gpu
    folder = _copy_export(dense_export, tmp_path / "export")
    cfg = EngineConfig(device="cuda:1", profile=EngineProfile.static(2, 16, 16, 2))
    with build_engine("tensorrt", folder, cfg) as eng:
        assert eng.device == "cuda:1" and eng.info()["device"] == "cuda:1"
        eng.run(make_feeds(eng.io_spec, 2, 16, 16))
    assert ran == [("build", 1), ("activate", 1), ("infer", 1), ("deactivate", 1)] and current == []
    with trtmod.TrtEngine(_fake_plan(tmp_path, EngineProfile.static(2, 16, 16, 2)), EngineConfig(device="cuda")) as eng:
        assert eng.device == "cuda:0"
    assert ran[-2:] == [("activate", 0), ("deactivate", 0)]


def test_run_returns_copies(fake_gpu, tmp_path):
    profile = EngineProfile(1, 2, 4, 8, 16, 32, 8, 16, 32, latent_multiple=2)
    with trtmod.TrtEngine(_fake_plan(tmp_path, profile), EngineConfig(device="cuda")) as eng:
        feeds = make_feeds(eng.io_spec, 2, 16, 16)
        first = eng.run(feeds)["latent"]
        second = eng.run(feeds)["latent"]
        assert (first == 1).all() and (second == 2).all()  # the second call did not overwrite the first's output


def test_profile_narrowed_to_the_built_one(fake_gpu, tmp_path):
    built = EngineProfile(1, 2, 4, 8, 16, 32, 8, 16, 32, latent_multiple=2)
    plan = _fake_plan(tmp_path, built)
    with trtmod.TrtEngine(plan, EngineConfig(device="cuda")) as eng:
        assert eng.profile == built and eng.files == (plan, sidecar_path(plan))  # what a build records
    wide = EngineProfile(1, 2, 8, 8, 16, 64, 8, 16, 64, latent_multiple=2)
    with trtmod.TrtEngine(plan, EngineConfig(device="cuda", profile=wide)) as eng:
        assert eng.profile == built
        with pytest.raises(UsageError, match="outside the engine profile"):
            eng.run(make_feeds(eng.io_spec, 8, 16, 16))  # refused here, not deep inside TensorRT
    with pytest.raises(UsageError, match="rebuild the engine for this profile"):
        trtmod.TrtEngine(plan, EngineConfig(device="cuda", profile=EngineProfile.static(8, 16, 16, 2)))


def test_create_without_profile_names_the_flags(fake_gpu, dense_export):
    with pytest.raises(UsageError, match="needs a shape profile") as info:
        trtmod.create(dense_export.folder, EngineConfig(device="cuda"))
    assert "--batch/--height/--width MIN,OPT,MAX" in str(info.value)


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed")
def test_clear_error_without_tensorrt(dense_export, tmp_path):
    with pytest.raises(MissingExtraError) as info:
        build_engine("tensorrt", dense_export.folder, EngineConfig(device="cuda", profile=EngineProfile.static(2, 16, 16, 2)))
    msg = str(info.value)
    assert "--backend tensorrt needs the optional package 'tensorrt'" in msg and "pip install 'slimexport[trt]'" in msg
    assert "needs an NVIDIA GPU" in msg and "install guide" in msg and "--backend onnxruntime or aoti" in msg
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


# ---------------------------------------------------------------- hardening (issue 21)


def test_polygraphy_floor():
    """pyproject's floor is the first Polygraphy that creates TensorRT 11 networks; an older one is refused."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()  # tomllib needs Python 3.11
    assert re.findall(r'"polygraphy\s*([<>=!~][^"]*)"', text) == [f">={trtmod.POLYGRAPHY_MIN}"]
    assert trtmod._version_tuple(trtmod.POLYGRAPHY_MIN) >= (0, 49, 7)
    with pytest.raises(UsageError, match="Polygraphy 0.49.6 cannot create networks with TensorRT 11.0.0.1") as info:
        trtmod.check_versions("11.0.0.1", "0.49.6")
    assert "pip install -U 'polygraphy>=0.49.7'" in str(info.value) and "\n" not in str(info.value)
    trtmod.check_versions("11.1.0", "0.49.7")
    trtmod.check_versions("11.1.0", "0.53.6")
    trtmod.check_versions("10.8.0.43", "0.49.0")  # TensorRT 10 still takes the flag
    assert trtmod._version_tuple("0.49.10") > trtmod._version_tuple("0.49.7")


def _polygraphy_error(message):
    from polygraphy.exception import PolygraphyException

    def fail(*args, **kwargs):
        raise PolygraphyException(message)

    return fail


def test_parser_and_build_errors_are_one_line(fake_gpu, dense_export, tmp_path, monkeypatch):
    import polygraphy.backend.trt as ptrt

    from slimexport.errors import SlimExportError

    folder = _copy_export(dense_export, tmp_path / "export")
    profile = EngineProfile.static(2, 16, 16, 2)
    monkeypatch.setattr(ptrt, "network_from_onnx_path", _polygraphy_error("Could not parse ONNX correctly\nmore"))
    with pytest.raises(ArtifactError, match=r"TensorRT could not parse .*model.onnx \(Could not parse ONNX correctly\)") as info:
        trtmod.build_trt_engine(folder, tmp_path / "engines", profile)
    assert "\n" not in str(info.value) and "re-export" in str(info.value)
    monkeypatch.setattr(ptrt, "network_from_onnx_path", lambda path, strongly_typed: FakeNetwork(b"x"))
    monkeypatch.setattr(ptrt, "engine_bytes_from_network", _polygraphy_error("Invalid Engine. Please ensure the engine was built correctly"))
    with pytest.raises(SlimExportError, match="could not build an engine .*Invalid Engine") as info:
        trtmod.build_trt_engine(folder, tmp_path / "engines", profile)
    assert "\n" not in str(info.value) and "--optimization-level" in str(info.value)
    assert not list((tmp_path / "engines").glob("*.plan"))


def test_load_and_run_errors_are_one_line(fake_gpu, tmp_path, monkeypatch):
    import polygraphy.backend.trt as ptrt

    from slimexport.errors import SlimExportError

    _, _, fake = fake_gpu
    profile = EngineProfile(1, 2, 4, 8, 16, 32, 8, 16, 32, latent_multiple=2)
    plan = _fake_plan(tmp_path, profile)
    with monkeypatch.context() as m:
        m.setattr(ptrt, "engine_from_bytes", _polygraphy_error("Could not deserialize engine. See log for details."))
        with pytest.raises(ArtifactError, match="could not deserialize .*Could not deserialize engine") as info:
            trtmod.TrtEngine(plan, EngineConfig(device="cuda"))
        assert "rebuild it" in str(info.value)
    with monkeypatch.context() as m:
        m.setattr(fake.runner_class, "activate", _polygraphy_error("Invalid Context. See error log for details."))
        with pytest.raises(SlimExportError, match="execution context .*Invalid Context"):
            trtmod.TrtEngine(plan, EngineConfig(device="cuda"))
    with trtmod.TrtEngine(plan, EngineConfig(device="cuda")) as eng:
        monkeypatch.setattr(eng.runner, "infer", _polygraphy_error("For input: sample, failed to set shape to: (2, 4, 16, 16)"))
        with pytest.raises(SlimExportError, match=r"could not run .* on sample \[2, 4, 16, 16\].*failed to set shape") as info:
            eng.run(make_feeds(eng.io_spec, 2, 16, 16))
        assert "\n" not in str(info.value) and "batch 1..4" in str(info.value)


def test_plan_written_after_the_network_is_released(fake_gpu, dense_export, tmp_path, monkeypatch):
    """Host memory: the parsed network (builder, network, parser: the weights) is gone before the plan is written,
    and the plan is written from TensorRT's buffer, not a bytes copy of it (FakeHostMemory refuses bytes())."""
    import weakref

    import polygraphy.backend.trt as ptrt

    folder = _copy_export(dense_export, tmp_path / "export")
    parse, write_plan, refs, released = ptrt.network_from_onnx_path, trtmod._write_plan, [], []

    def parse_and_watch(path, strongly_typed):
        network = parse(path, strongly_typed)
        refs.append(weakref.ref(network))
        return network

    def watch_and_write(plan, data):
        released.append(refs[0]() is None)
        write_plan(plan, data)

    monkeypatch.setattr(ptrt, "network_from_onnx_path", parse_and_watch)
    monkeypatch.setattr(trtmod, "_write_plan", watch_and_write)
    res = trtmod.build_trt_engine(folder, tmp_path / "engines", EngineProfile.static(2, 16, 16, 2))
    assert released == [True]
    assert res.plan.read_bytes() == b"plan:" + (folder / MODEL_FILE).read_bytes()[:16]
    assert res.sidecar["plan_sha256"] == sha256_file(res.plan)


def test_timing_cache_replaced_atomically_without_lock_file(fake_gpu, dense_export, tmp_path, monkeypatch):
    import io

    import polygraphy.backend.trt as ptrt

    from slimexport.errors import SlimExportError

    _, _, fake = fake_gpu
    folder = _copy_export(dense_export, tmp_path / "export")
    cache_dir, out = tmp_path / "cache", tmp_path / "engines"
    profile = EngineProfile.static(2, 16, 16, 2)
    trtmod.build_trt_engine(folder, out, profile, cache_dir=cache_dir)
    cache = cache_dir / timing_cache_filename(H100)
    assert fake.config["load_timing_cache"] is None and cache.read_bytes() == b"cache after build 1"
    assert sorted(p.name for p in cache_dir.iterdir()) == [cache.name]  # no .lock, no temporary
    # the next build starts from the cache (read, not locked) and replaces it
    trtmod.build_trt_engine(folder, out, profile, cache_dir=cache_dir, rebuild=True)
    loaded = fake.config["load_timing_cache"]
    assert isinstance(loaded, io.BytesIO) and loaded.getvalue() == b"cache after build 1"
    assert cache.read_bytes() == b"cache after build 2"
    # a build that fails after Polygraphy began writing leaves the old cache whole
    def half_written(network, config, save_timing_cache):
        save_timing_cache.write(b"torn")
        _polygraphy_error("Invalid Engine")()

    monkeypatch.setattr(ptrt, "engine_bytes_from_network", half_written)
    with pytest.raises(SlimExportError):
        trtmod.build_trt_engine(folder, out, profile, cache_dir=cache_dir, rebuild=True)
    assert cache.read_bytes() == b"cache after build 2"
    assert sorted(p.name for p in cache_dir.iterdir()) == [cache.name]


def test_device_info_from_the_engines_gpu(monkeypatch):
    """``cuda`` builds and runs on GPU 0: its name and compute capability come from GPU 0, not from torch's
    current device."""
    import torch

    gpus = {0: ("NVIDIA H100 80GB HBM3", (9, 0)), 1: ("NVIDIA A100-SXM4-80GB", (8, 0))}

    def index(dev):
        dev = torch.device(dev)
        return dev.index if dev.index is not None else torch.cuda.current_device()

    monkeypatch.setattr(trtmod, "_require_trt", lambda: types.SimpleNamespace(__version__="10.8.0.43"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: gpus[index(dev)][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: gpus[index(dev)][1])
    assert trtmod.current_device_info("cuda") == H100
    assert trtmod.current_device_info("cpu") == H100  # TensorRT replaces cpu with cuda:0
    assert trtmod.current_device_info("cuda:1").gpu_name == "NVIDIA A100-SXM4-80GB"
    with pytest.raises(UsageError, match="device cuda:2 does not exist: PyTorch sees 2 GPU"):
        trtmod.current_device_info("cuda:2")


def _lib(folder, name="libcudart.so.13"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"")
    return folder / name


def test_cudart_found_where_polygraphy_looks(tmp_path):
    lib = _lib(tmp_path / "cuda" / "lib64", "libcudart.so.12")
    assert trtmod.check_cudart([str(tmp_path / "none"), str(lib.parent)], [], loads=lambda name: False) == str(lib)
    assert trtmod.check_cudart([str(tmp_path / "none")], [], loads=lambda name: True) == "libcudart.so"


def test_cudart_elsewhere_names_the_folder(tmp_path, monkeypatch):
    """A pip-only CUDA 13 (nvidia/cu13/lib) that Polygraphy does not search: the error says what to export."""
    site = tmp_path / "site-packages"
    lib = _lib(site / "nvidia" / "cu13" / "lib")
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    assert str(lib.parent) in trtmod.other_cudart_dirs()
    with pytest.raises(UsageError, match="would not find the CUDA runtime") as info:
        trtmod.check_cudart([str(tmp_path / "none")], loads=lambda name: False)
    msg = str(info.value)
    assert f"there is one at {lib}" in msg and f"export LD_LIBRARY_PATH={lib.parent}" in msg and "\n" not in msg
    with pytest.raises(UsageError, match="none was found elsewhere") as info:
        trtmod.check_cudart([str(tmp_path / "none")], [str(tmp_path / "empty")], loads=lambda name: False)
    assert "nvidia-cuda-runtime-cu12" in str(info.value)


def test_polygraphy_search_follows_ld_library_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LD_LIBRARY_PATH", str(tmp_path / "mine"))
    assert str(tmp_path / "mine") in trtmod.polygraphy_cudart_dirs()
    lib = _lib(tmp_path / "mine")
    assert trtmod.locate_cudart(loads=lambda name: False) == (str(lib), [])


def test_engine_takes_one_timestep(fake_gpu, tmp_path):
    """The engine's own check lets [1] through (the profile covers it) and hands TensorRT float32."""
    _, _, fake = fake_gpu
    profile = EngineProfile(1, 2, 4, 8, 16, 32, 8, 16, 32, latent_multiple=2)
    with trtmod.TrtEngine(_fake_plan(tmp_path, profile), EngineConfig(device="cuda")) as eng:
        feeds = make_feeds(eng.io_spec, 4, 16, 16, one_timestep=True)
        eng.run(dict(feeds, timestep=feeds["timestep"].astype(np.float16)))  # the sample's dtype
        assert fake.feeds["timestep"].shape == (1,) and fake.feeds["timestep"].dtype == np.float32
