"""Shared fixtures: the ``tiny`` dense UNet, a hand-made slim UNet, and their ONNX exports (made once)."""

from __future__ import annotations

import pytest
import torch

from slimexport.models.load import build_unet
from slimexport.models.registry import TINY_UNET
from slimexport.slim.apply import install_processors, replace_linears

SLIM_BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
RANK_QK, RANK_VO = 8, 4  # per head; the dense head size is 16


def make_slim_unet(seed: int = 1):
    """``tiny`` with one block's self-attention slimmed: q/k per-head size 8, v/o per-head size 4."""
    unet = build_unet(TINY_UNET)
    attn = unet.get_submodule(SLIM_BLOCK + ".attn1")
    heads, width = attn.heads, attn.to_q.in_features
    g = torch.Generator().manual_seed(seed)
    scale = width ** -0.5
    replace_linears(unet, {
        f"{SLIM_BLOCK}.attn1.to_q.weight": torch.randn(heads * RANK_QK, width, generator=g) * scale,
        f"{SLIM_BLOCK}.attn1.to_k.weight": torch.randn(heads * RANK_QK, width, generator=g) * scale,
        f"{SLIM_BLOCK}.attn1.to_v.weight": torch.randn(heads * RANK_VO, width, generator=g) * scale,
        f"{SLIM_BLOCK}.attn1.to_out.0.weight": torch.randn(width, heads * RANK_VO, generator=g) * (heads * RANK_VO) ** -0.5,
    })
    install_processors(unet)
    return unet.eval()


@pytest.fixture(scope="session")
def dense_unet():
    return build_unet(TINY_UNET)


@pytest.fixture(scope="session")
def slim_unet():
    return make_slim_unet()


@pytest.fixture(scope="session")
def dense_export(dense_unet, tmp_path_factory):
    from slimexport.engines.onnx_export import export_unet_onnx

    return export_unet_onnx(dense_unet, tmp_path_factory.mktemp("onnx") / "dense")


@pytest.fixture(scope="session")
def slim_export(slim_unet, tmp_path_factory):
    from slimexport.engines.onnx_export import export_unet_onnx

    return export_unet_onnx(slim_unet, tmp_path_factory.mktemp("onnx") / "slim")


@pytest.fixture(scope="session")
def slim_export_fp16(slim_unet, tmp_path_factory):
    from slimexport.engines.onnx_export import export_unet_onnx

    return export_unet_onnx(slim_unet, tmp_path_factory.mktemp("onnx") / "slim16", dtype="fp16")


def _torch_reference(unet, feeds):
    with torch.no_grad():
        return unet(torch.from_numpy(feeds["sample"]).float(), torch.from_numpy(feeds["timestep"]),
                    torch.from_numpy(feeds["encoder_hidden_states"]).float(), return_dict=False)[0].numpy()


@pytest.fixture(scope="session")
def torch_reference():
    """``f(unet, numpy feeds) -> numpy``: the fp32 PyTorch output, called directly on the diffusers UNet."""
    return _torch_reference
