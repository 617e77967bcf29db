"""Shared fixtures: a slim ``tiny`` UNet and a measured change profile (CPU, seconds)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def slim_tiny_unet():
    """``tiny`` with narrower layers (as ``load_slim_unet`` gives them): one block's self-attention at query-key
    size 8 and value-output size 4 per head (dense: 16), through the slim attention processor."""
    import torch

    from slimexport.models.load import build_unet
    from slimexport.models.registry import TINY_UNET
    from slimexport.slim.apply import install_processors, replace_linears

    unet = build_unet(TINY_UNET)
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    attn = unet.get_submodule(block)
    heads, width = attn.heads, attn.to_q.in_features
    g = torch.Generator().manual_seed(1)
    replace_linears(unet, {
        f"{block}.to_q.weight": torch.randn(heads * 8, width, generator=g) * width ** -0.5,
        f"{block}.to_k.weight": torch.randn(heads * 8, width, generator=g) * width ** -0.5,
        f"{block}.to_v.weight": torch.randn(heads * 4, width, generator=g) * width ** -0.5,
        f"{block}.to_out.0.weight": torch.randn(width, heads * 4, generator=g) * (heads * 4) ** -0.5,
    })
    install_processors(unet)
    return unet.eval()


@pytest.fixture(scope="session")
def tiny_profile(tiny):
    """The feature change of ``tiny`` over 3 prompts × 5 DDIM steps with CFG."""
    from slimexport.config import CalibConfig
    from slimexport.stepcache.measure import measure_change

    cfg = CalibConfig(num_prompts=3, num_steps=5, num_bins=5, batch_size=3)
    return measure_change(tiny, ["a red fox", "a blue sky", "a small boat"], cfg)
