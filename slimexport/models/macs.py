"""Multiply-accumulate counts of a UNet forward, by hooks on a shape-only (meta-device) copy.

Counted: every ``Conv2d``, ``Linear`` and factored projection (weights × output positions) and the attention score and
probability-times-value products (``B·H·N·S·(r_qk + r_vo)``). Norms, activations and additions are left
out, as in the usual "GMACs" figures (SD1.4: 339 G without attention products, 401.6 G with them at 512²).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from slimexport.models.kinds import UNITS


def _meta_copy(module: nn.Module) -> nn.Module:
    """A shape-only copy (parameters and buffers on the meta device), without copying any data."""
    memo = {id(t): (nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False) if isinstance(t, nn.Parameter)
                    else torch.empty_like(t, device="meta"))
            for t in list(module.parameters()) + list(module.buffers())}
    return copy.deepcopy(module, memo)


def count_macs(unet, batch: int = 1, height: int | None = None, width: int | None = None, seq_len: int = 77) -> dict:
    """``{"total", "conv", "linear", "attention"}`` MACs of one forward at ``batch`` × latent ``height`` × ``width``."""
    cfg = unet.config
    h = height or int(cfg.sample_size)
    w = width or int(cfg.sample_size)
    meta = unet if next(unet.parameters()).device.type == "meta" else _meta_copy(unet)
    counts = {"conv": 0, "linear": 0, "attention": 0}
    handles = []

    def conv_hook(mod, args, out):
        counts["conv"] += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    def linear_hook(mod, args, out):
        counts["linear"] += out.numel() * mod.in_features

    def lowrank_hook(mod, args, out):  # a factored projection: (x U) V
        counts["linear"] += out.numel() // mod.out_features * mod.rank * (mod.in_features + mod.out_features)

    def attn_hook(mod, args, kwargs, out):
        hs = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        n = hs.shape[1] if hs.dim() == 3 else hs.shape[2] * hs.shape[3]
        s = n if ctx is None else ctx.shape[1]
        counts["attention"] += hs.shape[0] * n * s * (mod.to_q.out_features + mod.to_v.out_features)

    for m in meta.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif type(m).__name__ == "LowRankProj":
            handles.append(m.register_forward_hook(lowrank_hook))
        elif type(m).__name__ == "Attention":
            handles.append(m.register_forward_hook(attn_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            x = torch.empty(batch, int(cfg.in_channels), h, w, device="meta")
            ctx = torch.empty(batch, seq_len, int(cfg.cross_attention_dim), device="meta")
            meta(x, torch.empty(batch, device="meta"), encoder_hidden_states=ctx)
    finally:
        for hd in handles:
            hd.remove()
    counts["total"] = sum(counts.values())
    return counts


def _positions(x) -> int:
    return x.shape[-2] * x.shape[-1] if x.dim() == 4 else x.shape[-2]


def token_counts(unet, height: int | None = None, width: int | None = None, seq_len: int = 77) -> dict[str, int]:
    """Positions each unit of the kinds table sees in one forward at batch 1 (meta device).

    Returns ``{unit path: tokens}``: the positions of the unit's ``token_module`` input (image tokens of a
    transformer block, pixels of a ResNet block's ``conv2`` input, positions of a transformer's ``proj_in``).
    """
    cfg = unet.config
    h = height or int(cfg.sample_size)
    w = width or int(cfg.sample_size)
    meta = unet if next(unet.parameters()).device.type == "meta" else _meta_copy(unet)
    out: dict[str, int] = {}
    handles = []
    for name, m in meta.named_modules():
        unit = next((u for u in UNITS.values() if type(m).__name__ == u.module_class), None)
        if unit is None:
            continue
        handles.append(m.get_submodule(unit.token_module).register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: out.__setitem__(name, _positions(args[0] if args else kwargs["hidden_states"])),
            with_kwargs=True))
    try:
        with torch.no_grad():
            meta(torch.empty(1, int(cfg.in_channels), h, w, device="meta"), torch.empty(1, device="meta"),
                 encoder_hidden_states=torch.empty(1, seq_len, int(cfg.cross_attention_dim), device="meta"))
    finally:
        for hd in handles:
            hd.remove()
    return out
