"""The trajectory-fidelity gate of cached sampling against the dense uncached pipeline."""

from __future__ import annotations

import pytest

from slimexport.stepcache import CacheConfig, CachedUNet, CachePlan
from slimexport.stepcache.fidelity import cached_vs_dense

PROMPTS = ["a red fox", "a blue sky"]


def test_all_full_schedule_is_the_dense_trajectory(tiny):
    res = cached_vs_dense(tiny, tiny.unet, CachedUNet(tiny.unet, CachePlan(CacheConfig(mode=1))), PROMPTS, steps=4)
    assert res["passed"] and res["pattern"] == "FFFF"
    assert res["final_cosine"] == pytest.approx(1.0, abs=1e-9) and res["final_rel_l2"] < 1e-6


def test_cached_trajectory_is_close_and_gated(tiny, slim_tiny_unet):
    cached = CachedUNet(tiny.unet, CachePlan(CacheConfig(mode=2)))
    res = cached_vs_dense(tiny, tiny.unet, cached, PROMPTS, steps=6)
    assert res["pattern"] == "FsFsFs" and res["passed"]
    assert 0.9 < res["final_cosine"] < 1.0 and res["final_rel_l2"] > 1e-5
    strict = cached_vs_dense(tiny, tiny.unet, cached, PROMPTS, steps=6, min_cosine=0.999999)
    assert not strict["passed"] and "final-latent cosine" in strict["reason"]
    stacked = cached_vs_dense(tiny, tiny.unet, CachedUNet(slim_tiny_unet, CachePlan(CacheConfig(mode=2))), PROMPTS, steps=6)
    assert stacked["final_rel_l2"] > 0 and stacked["pattern"] == "FsFsFs"
