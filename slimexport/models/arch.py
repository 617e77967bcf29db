"""The map of compressible modules in a diffusers ``UNet2DConditionModel``.

This file, ``kinds.py`` (the table of compressible kinds built on these sizes) and ``slimexport/slim/`` are the
only code that knows diffusers' module names. A *block* is one
``BasicTransformerBlock`` (``...attentions.i.transformer_blocks.j``); it holds five compressible *modules*:

====================  ==========================================  ============================
module id suffix      weights                                      decomposition
====================  ==========================================  ============================
``attn1.qk``          ``attn1.to_q``, ``attn1.to_k``                Type II whitening-SVD
``attn1.vo``          ``attn1.to_v``, ``attn1.to_out.0``            Type III whitening-SVD
``attn2.qk``          ``attn2.to_q``, ``attn2.to_k``                Type II (keys: text tokens)
``attn2.vo``          ``attn2.to_v``, ``attn2.to_out.0``            Type III (inputs: text tokens)
``ff``                ``ff.net.0.proj`` (GEGLU), ``ff.net.2``        Type I Nyström
====================  ==========================================  ============================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn

from slimexport.errors import UsageError


def latent_multiple(unet) -> int:
    """What latent heights and widths must be multiples of: one halving per down block after the first (8 for
    SD1.x/2.x), so skip connections line up. ``unet``: a diffusers UNet or its config."""
    cfg = getattr(unet, "config", unet)
    return 2 ** (len(cfg.block_out_channels) - 1)


def context_dim(unet) -> int:
    """Width of the text tokens the UNet's cross-attention reads (diffusers' ``cross_attention_dim``)."""
    return int(getattr(unet, "config", unet).cross_attention_dim)


@dataclass(frozen=True)
class BlockInfo:
    """Sizes of one transformer block (from the dense model).

    Attributes:
        path: module path of the ``BasicTransformerBlock`` in the UNet.
        width: channels C of the block (query input width).
        num_heads: attention heads H (both attentions).
        head_dim: original per-head size d = C / H.
        context_dim: width of the text tokens read by ``attn2.to_k``/``to_v``.
        ffn_width: GEGLU intermediate width (4C in SD).
    """

    path: str
    width: int
    num_heads: int
    head_dim: int
    context_dim: int
    ffn_width: int

    def to_dict(self) -> dict:
        return asdict(self)


def _is_geglu_ff(ff) -> bool:
    net = getattr(ff, "net", None)
    if net is None or len(net) < 3:
        return False
    first = net[0]
    return type(first).__name__ == "GEGLU" and isinstance(getattr(first, "proj", None), nn.Linear) and isinstance(net[2], nn.Linear)


def transformer_blocks(unet) -> list[tuple[str, nn.Module]]:
    """All ``BasicTransformerBlock``s of the UNet, in module order."""
    return [(name, mod) for name, mod in unet.named_modules() if type(mod).__name__ == "BasicTransformerBlock"]


def block_info(path: str, block) -> BlockInfo:
    """Check that a block has the SD layout the decompositions assume, and read its sizes."""
    a1, a2 = block.attn1, getattr(block, "attn2", None)
    if a2 is None or not getattr(a2, "is_cross_attention", True):
        raise UsageError(f"{path} has no cross-attention (attn2)", "only SD-style blocks with self- and cross-attention are supported")
    for name, attn in (("attn1", a1), ("attn2", a2)):
        for proj in ("to_q", "to_k", "to_v"):
            if getattr(attn, proj).bias is not None:
                raise UsageError(f"{path}.{name}.{proj} has a bias", "only bias-free q/k/v projections (SD1.x/2.x) are supported")
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise UsageError(f"{path}.{name} normalises q/k", "QK-normed attention (SD3, Flux) is out of scope")
    if not _is_geglu_ff(block.ff):
        raise UsageError(f"{path}.ff is not a GEGLU feed-forward", "only SD-style GEGLU feed-forwards are supported")
    width = a1.to_q.in_features
    heads = a1.heads
    inner = a1.to_q.out_features
    return BlockInfo(
        path=path, width=width, num_heads=heads, head_dim=inner // heads,
        context_dim=a2.to_k.in_features, ffn_width=block.ff.net[2].in_features,
    )


def blocks(unet) -> list[BlockInfo]:
    """``BlockInfo`` of every transformer block; raises a clear error for unsupported layouts."""
    out = [block_info(p, b) for p, b in transformer_blocks(unet)]
    if not out:
        raise UsageError("the UNet has no transformer blocks", "slimexport compresses UNets with cross-attention blocks (SD1.x/2.x)")
    return out


@dataclass(frozen=True)
class ResnetInfo:
    """Sizes of one ``ResnetBlock2D`` (from the dense model).

    The *inner* channels (``conv1`` outputs = ``norm2`` channels = ``conv2`` inputs, with the matching rows of
    ``time_emb_proj``) are the analogue of the FFN's intermediate width; they are kept or removed in whole
    GroupNorm groups so that the kept channels are normalised exactly as before.

    Attributes:
        path: module path of the block.
        in_channels, out_channels: block input and output channels (unchanged by slimming).
        inner: inner channels (``conv1.out_channels``).
        groups: GroupNorm groups of ``norm2``; ``group_size = inner // groups``.
        temb_dim: input width of ``time_emb_proj`` (0 when absent).
        kernel1, kernel2: ``conv1``/``conv2`` kernel elements (9 for 3×3).
    """

    path: str
    in_channels: int
    out_channels: int
    inner: int
    groups: int
    temb_dim: int
    kernel1: int
    kernel2: int

    @property
    def group_size(self) -> int:
        return self.inner // self.groups

    def to_dict(self) -> dict:
        return asdict(self)


def resnet_info(path: str, block) -> ResnetInfo:
    if getattr(block, "time_embedding_norm", "default") != "default":
        raise UsageError(f"{path} uses time_embedding_norm={block.time_embedding_norm!r}", "only SD-style ResNet blocks can be slimmed")
    c1, c2, n2 = block.conv1, block.conv2, block.norm2
    if not isinstance(n2, nn.GroupNorm) or n2.num_channels != c1.out_channels or c2.in_channels != c1.out_channels:
        raise UsageError(f"{path} is not an SD-style ResNet block (conv1 → GroupNorm → conv2)", "drop 'resnet' from --targets")
    if c1.groups != 1 or c2.groups != 1:
        raise UsageError(f"{path} has grouped convolutions", "drop 'resnet' from --targets")
    temb = block.time_emb_proj
    return ResnetInfo(
        path=path, in_channels=c1.in_channels, out_channels=c2.out_channels, inner=c1.out_channels,
        groups=n2.num_groups, temb_dim=temb.in_features if temb is not None else 0,
        kernel1=c1.kernel_size[0] * c1.kernel_size[1], kernel2=c2.kernel_size[0] * c2.kernel_size[1],
    )


def resnet_blocks(unet) -> list[ResnetInfo]:
    """``ResnetInfo`` of every ``ResnetBlock2D`` of the UNet, in module order."""
    return [resnet_info(n, m) for n, m in unet.named_modules() if type(m).__name__ == "ResnetBlock2D"]


@dataclass(frozen=True)
class ProjInfo:
    """Sizes of the ``proj_in``/``proj_out`` pair of one ``Transformer2DModel`` (from the dense model).

    Each projection is an ordinary ``Linear`` (``use_linear_projection``, SD2.x) or a 1×1 ``Conv2d`` (SD1.x);
    with the ``proj`` target either is replaced by a rank-r factor pair ``(x U) V + b`` (method notes §14).

    Attributes:
        path: module path of the ``Transformer2DModel``.
        channels: its input/output channels (``proj_in`` input, ``proj_out`` output).
        inner: the transformer width (``proj_in`` output, ``proj_out`` input).
        conv: the projections are 1×1 convolutions (NCHW) rather than ``Linear`` layers.
    """

    path: str
    channels: int
    inner: int
    conv: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def sizes(self, kind: str) -> tuple[int, int]:
        """``(in, out)`` features of ``proj_in`` or ``proj_out``."""
        return (self.channels, self.inner) if kind == "proj_in" else (self.inner, self.channels)


def proj_info(path: str, mod) -> ProjInfo:
    pi, po = mod.proj_in, mod.proj_out
    for name, p in (("proj_in", pi), ("proj_out", po)):
        if isinstance(p, nn.Conv2d):
            if p.kernel_size != (1, 1) or p.groups != 1 or p.stride != (1, 1):
                raise UsageError(f"{path}.{name} is a {p.kernel_size} convolution", "drop 'proj' from --targets")
        elif not isinstance(p, nn.Linear):
            raise UsageError(f"{path}.{name} is a {type(p).__name__}", "drop 'proj' from --targets")
    conv = isinstance(pi, nn.Conv2d)
    cin = pi.in_channels if conv else pi.in_features
    inner = pi.out_channels if conv else pi.out_features
    return ProjInfo(path=path, channels=cin, inner=inner, conv=conv)


def projections(unet) -> list[ProjInfo]:
    """``ProjInfo`` of every ``Transformer2DModel`` that has plain ``proj_in``/``proj_out`` layers, in module order."""
    out = []
    for n, m in unet.named_modules():
        if type(m).__name__ == "Transformer2DModel" and isinstance(getattr(m, "proj_in", None), (nn.Linear, nn.Conv2d)):
            out.append(proj_info(n, m))
    return out
