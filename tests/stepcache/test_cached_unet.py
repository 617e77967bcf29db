"""CachedUNet as ``pipe.unet`` in diffusers' StableDiffusionPipeline (tiny model, CFG, DDIM)."""

from __future__ import annotations

import pytest
import torch

from slimexport.errors import UsageError
from slimexport.stepcache import CacheConfig, CachedUNet, CachePlan, Schedule
from slimexport.stepcache.unet import SplitUNet


@pytest.fixture(scope="module")
def pipe(tiny):
    p = tiny.pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def _generate(pipe, steps=6, seed=0, guidance=5.0):
    return pipe("a red fox", num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


@pytest.fixture(scope="module")
def dense_latents(pipe):
    return _generate(pipe)


def _with_unet(pipe, unet):
    original = pipe.unet
    pipe.unet = unet
    return original


def test_all_full_schedule_reproduces_the_uncached_pipeline(pipe, dense_latents):
    original = _with_unet(pipe, CachedUNet(pipe.unet, CachePlan(CacheConfig(mode=1))))
    try:
        out = _generate(pipe)
        assert pipe.unet.history == "FFFFFF"
    finally:
        pipe.unet = original
    torch.testing.assert_close(out, dense_latents, atol=1e-5, rtol=1e-5)


def test_cached_pipeline_follows_the_schedule_and_resets(pipe, dense_latents):
    cached = CachedUNet(pipe.unet, CachePlan(CacheConfig(mode=3)))
    original = _with_unet(pipe, cached)
    try:
        first = _generate(pipe)
        assert cached.history == "FssFss"
        longer = _generate(pipe, steps=7)  # a new generation, another step count: the plan decides by call
        assert cached.history == "FssFssF"
        again = _generate(pipe)  # resets by itself: the same result as the first generation
        assert cached.history == "FssFss"
        assert cached.cursor.calls_full == 2 + 3 + 2
    finally:
        pipe.unet = original
    torch.testing.assert_close(again, first, atol=1e-6, rtol=1e-6)
    err = float((first - dense_latents).norm() / dense_latents.norm())
    assert 1e-6 < err < 0.5  # cached, so not identical; close, the model being the same
    assert longer.shape == first.shape


def test_shallow_calls_are_the_shallow_path_on_the_last_full_cache(tiny):
    """Call by call, outside a pipeline: a CFG batch (2 rows), a full step then a shallow one."""
    cached = CachedUNet(tiny.unet, Schedule(1, (True, False)))
    split = SplitUNet(tiny.unet, 1)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        out0 = cached(x0, torch.tensor(801), ctx).sample
        out1 = cached(x1, torch.tensor(601), ctx, return_dict=False)[0]
        ref0, cache = split.full(x0, torch.tensor(801), ctx)
        ref1 = split.shallow(x1, torch.tensor(601), ctx, cache)
        assert float((ref1 - tiny.unet(x1, torch.tensor(601), ctx).sample).abs().max()) > 1e-4
    torch.testing.assert_close(out0, ref0)
    torch.testing.assert_close(out1, ref1)
    cached.reset()
    with torch.no_grad():
        cached(x1, torch.tensor(601), ctx)
    assert cached.history == "F"


def test_pipeline_reads_the_unet_attributes(tiny):
    cached = CachedUNet(tiny.unet, CachePlan(CacheConfig(mode=2)))
    assert cached.config is tiny.unet.config
    assert cached.dtype == torch.float32 and cached.device.type == "cpu"
    assert cached.unet is tiny.unet  # shared, not copied
    assert sum(p.numel() for p in cached.parameters()) == sum(p.numel() for p in tiny.unet.parameters())


def test_unsupported_inputs_and_depths_are_refused(tiny):
    cached = CachedUNet(tiny.unet, CachePlan(CacheConfig(mode=2)))
    x, ctx = torch.zeros(1, 4, 16, 16), torch.zeros(1, 77, 32)
    with pytest.raises(UsageError, match="does not take timestep_cond"):
        cached(x, 1, ctx, timestep_cond=torch.zeros(1, 4))
    with pytest.raises(UsageError, match="down_block_additional_residuals"):
        cached(x, 1, ctx, down_block_additional_residuals=(x,), mid_block_additional_residual=x)
    with pytest.raises(UsageError) as err:
        CachedUNet(tiny.unet, CachePlan(CacheConfig(mode=2, depth=3)))
    assert "1..2" in str(err.value) and "\n" not in str(err.value)
