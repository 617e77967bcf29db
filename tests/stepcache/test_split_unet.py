"""The split UNet: the full path is the UNet, the shallow path with the same step's cache is the UNet too."""

from __future__ import annotations

import pytest
import torch

from slimexport.errors import UsageError
from slimexport.stepcache.unet import SplitUNet, cache_channels, cache_scale, check_depth, num_levels


def _inputs(batch=4, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, h, w, generator=g), torch.randn(batch, 77, 32, generator=g)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("hw", [(16, 16), (9, 11)])  # 9x11: upsamplers are given the skip tensors' sizes
def test_full_and_same_step_shallow_reproduce_the_unet(tiny, depth, hw):
    unet = tiny.unet
    x, ctx = _inputs(h=hw[0], w=hw[1])
    t = torch.tensor([999.0, 999.0, 250.0, 250.0])  # per-row timesteps, as in a CFG batch of two prompts
    split = SplitUNet(unet, depth)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        eps, cache = split.full(x, t, ctx)
        shallow = split.shallow(x, t, ctx, cache)
    torch.testing.assert_close(eps, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(shallow, ref, atol=1e-6, rtol=1e-5)
    scale = cache_scale(unet, depth)
    assert cache.shape == (4, cache_channels(unet, depth), -(-hw[0] // scale), -(-hw[1] // scale))


def test_shallow_path_uses_the_cache(tiny):
    """A cache from another step changes the output (the deep part really is skipped), by a bounded amount."""
    split = SplitUNet(tiny.unet, 1)
    x, ctx = _inputs()
    with torch.no_grad():
        ref, _ = split.full(x, torch.tensor(500.0), ctx)
        _, other = split.full(x + 0.3 * torch.randn_like(x), torch.tensor(600.0), ctx)
        out = split.shallow(x, torch.tensor(500.0), ctx, other)
    err = float((out - ref).norm() / ref.norm())
    assert 1e-4 < err < 1.0


def test_all_depths_from_one_full_call(tiny):
    split = SplitUNet(tiny.unet, 1)
    x, ctx = _inputs(batch=2)
    with torch.no_grad():
        _, caches = split.full(x, torch.tensor(10.0), ctx, all_depths=True)
        for d in (1, 2):
            torch.testing.assert_close(SplitUNet(tiny.unet, d).full(x, torch.tensor(10.0), ctx)[1], caches[d])
    assert sorted(caches) == [1, 2]


def test_slim_unet_splits_too(slim_tiny_unet):
    x, ctx = _inputs(batch=2)
    t = torch.tensor(700.0)
    with torch.no_grad():
        ref = slim_tiny_unet(x, t, ctx).sample
        eps, cache = SplitUNet(slim_tiny_unet, 2).full(x, t, ctx)
        shallow = SplitUNet(slim_tiny_unet, 2).shallow(x, t, ctx, cache)
    torch.testing.assert_close(eps, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(shallow, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("depth", [0, 3, -1, 1.0, True, "1"])
def test_depth_outside_the_unet_is_a_one_line_error(tiny, depth):
    with pytest.raises(UsageError) as err:
        SplitUNet(tiny.unet, depth)
    msg = str(err.value)
    assert "\n" not in msg and "1..2" in msg and "pass a depth" in msg


def test_levels_and_valid_depths(tiny):
    assert num_levels(tiny.unet) == 2
    assert check_depth(tiny.unet, 2) == 2
