"""``LowRankProj``: a ``Linear`` or 1×1 ``Conv2d`` factored as ``y = (x U) V + b`` (the ``proj`` target).

The forward goes through :func:`slimexport.kernels.lowrank_linear` (the fused Triton kernel on CUDA where it is
faster for the shape, two matmuls elsewhere); ONNX export and ``torch.export`` trace the reference, so the
graph holds two ``MatMul``s and an ``Add``. A 1×1 convolution's NCHW input is read with channels last, as a
``Linear`` over the channels.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class LowRankProj(nn.Module):
    """``y = (x U) V + b`` over the last dimension (``conv=False``) or the channels of NCHW input (``conv=True``).

    Args:
        in_features, out_features: sizes of the layer it replaces.
        rank: inner size r; ``U: [in, r]``, ``V: [r, out]``.
        bias: whether the layer has a bias ``b: [out]``.
        conv: the replaced layer was a 1×1 ``Conv2d`` (input and output NCHW).
    """

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool = True, conv: bool = False,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.rank, self.out_features, self.conv = in_features, rank, out_features, conv
        self.u = nn.Parameter(torch.empty(in_features, rank, **kw))
        self.v = nn.Parameter(torch.empty(rank, out_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from slimexport.kernels import lowrank_linear

        if self.conv:
            # permute, not movedim: the TorchScript ONNX exporter mis-infers shapes after movedim
            return lowrank_linear(x.permute(0, 2, 3, 1), self.u, self.v, self.bias).permute(0, 3, 1, 2)
        return lowrank_linear(x, self.u, self.v, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.rank} -> {self.out_features}, bias={self.bias is not None}, conv={self.conv}"


def dense_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W [out, in], b)`` of a ``Linear`` or 1×1 ``Conv2d``."""
    w = layer.weight
    return (w.reshape(w.shape[0], w.shape[1]) if w.dim() == 4 else w), layer.bias


def factor_layer(parent: nn.Module, name: str, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> LowRankProj:
    """Replace ``parent.<name>`` (a ``Linear`` or 1×1 ``Conv2d``) by a :class:`LowRankProj` holding ``u``, ``v``, ``bias``."""
    old = getattr(parent, name)
    p = old.weight if not isinstance(old, LowRankProj) else old.u
    new = LowRankProj(u.shape[0], u.shape[1], v.shape[1], bias=bias is not None, conv=_is_conv(old), device=p.device, dtype=p.dtype)
    with torch.no_grad():
        new.u.copy_(u)
        new.v.copy_(v)
        if bias is not None:
            new.bias.copy_(bias)
    setattr(parent, name, new.requires_grad_(p.requires_grad))
    return new


def _is_conv(layer: nn.Module) -> bool:
    return layer.conv if isinstance(layer, LowRankProj) else isinstance(layer, nn.Conv2d)
