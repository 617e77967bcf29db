"""The full/shallow ONNX pair: parity with torch at full and shallow steps, and a cached engine sampling loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slimexport.engines.base import build_engine
from slimexport.errors import ArtifactError, UsageError
from slimexport.stepcache import CacheConfig, CachePlan
from slimexport.stepcache.export import (
    CACHE,
    CachedEngineUNet,
    EngineUNet,
    export_cache_pair,
    read_pair,
    sample_with_engines,
)
from slimexport.stepcache.unet import SplitUNet

ATOL = 1e-4  # fp32 export parity tolerance (README: atol = rtol = 1e-4)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    return folder, export_cache_pair(tiny.unet, folder, depth=1)


@pytest.fixture(scope="module", params=["onnxruntime", "torch"])
def pair(tiny, exported, request):
    """The exported pair on ONNX Runtime, or the PyTorch paths as engines (``--backend torch``): same I/O."""
    folder, rec = exported
    if request.param == "torch":
        from slimexport.stepcache.torch_pair import torch_pair

        return (folder, rec, *torch_pair(tiny.unet, 1))
    return folder, rec, build_engine("onnxruntime", folder / "full"), build_engine("onnxruntime", folder / "shallow")


def _feeds(batch=2, h=16, w=24, t=(750.0,), seed=0):
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((batch, 4, h, w)).astype("float32"),
            "timestep": np.array(t, dtype="float32"),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 32)).astype("float32")}


def _torch(feeds):
    return [torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states")]


def test_pair_record(pair):
    folder, rec, full, shallow = pair
    assert rec["depth"] == 1 and rec["cache_channels"] == 64 and rec["cache_scale"] == 1
    assert [e["name"] for e in full.io_spec["outputs"]] == ["latent", CACHE]
    assert [e["name"] for e in shallow.io_spec["inputs"]] == ["sample", "timestep", "encoder_hidden_states", CACHE]
    assert rec["shallow"]["size_bytes"] < rec["full"]["size_bytes"] / 2  # the skipped blocks' weights are absent
    assert read_pair(folder, verify=True)["depth"] == 1


@pytest.mark.parametrize("t", [(750.0,), (900.0, 900.0)])  # timestep [1] and [2B]
def test_full_engine_is_the_unet_and_shallow_engine_the_shallow_path(tiny, pair, t):
    _, _, full, shallow = pair
    feeds = _feeds(t=t)
    out = full.run(feeds)
    split = SplitUNet(tiny.unet, 1)
    with torch.no_grad():
        ref = tiny.unet(*_torch(feeds)).sample.numpy()
        _, ref_cache = split.full(*_torch(feeds))
    np.testing.assert_allclose(out["latent"], ref, atol=ATOL, rtol=ATOL)  # a "full" step: the uncached UNet
    np.testing.assert_allclose(out[CACHE], ref_cache.numpy(), atol=ATOL, rtol=ATOL)
    # a "shallow" step: another step's input, this step's cache, against the torch shallow path
    later = _feeds(t=(500.0,) * len(t), seed=1)
    got = shallow.run({**later, CACHE: out[CACHE]})["latent"]
    with torch.no_grad():
        want = split.shallow(*_torch(later), torch.from_numpy(out[CACHE])).numpy()
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)


def test_engine_sampling_loop_matches_the_torch_cached_pipeline(tiny, pair):
    from slimexport.stepcache.wrapper import CachedUNet

    _, _, full, shallow = pair
    plan = CachePlan(CacheConfig(mode=2))
    cond = tiny.encoder.encode(["a red fox"])[0]
    uncond = tiny.encoder.encode([""])[0]
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    engines = CachedEngineUNet(full, shallow, plan)
    got = sample_with_engines(engines, tiny, cond, uncond, lat, 5, 5.0)
    assert engines.history == "FsFsF"
    want = sample_with_engines(CachedUNet(tiny.unet, plan), tiny, cond, uncond, lat, 5, 5.0)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    dense = sample_with_engines(EngineUNet(full), tiny, cond, uncond, lat, 5, 5.0)  # the full engine every step
    assert float((got - dense).norm() / dense.norm()) > 1e-5
    again = sample_with_engines(engines, tiny, cond, uncond, lat, 5, 5.0)
    torch.testing.assert_close(again, got, atol=1e-6, rtol=1e-6)


def test_export_refusals(tiny, tmp_path):
    with pytest.raises(UsageError, match="1..2"):
        export_cache_pair(tiny.unet, tmp_path / "p", depth=3)
    with pytest.raises(UsageError, match="dtype"):
        export_cache_pair(tiny.unet, tmp_path / "p", depth=1, dtype="int8")
    with pytest.raises(ArtifactError):
        read_pair(tmp_path)
