"""How a slim UNet holds each kind (``Kind.slim``): reading its shapes off a module and giving a dense module them.

``slim_plan.json`` keeps, per unit path, the entry these forms read and write (format ``slimexport.slim/1``):

==================  ===============================================  =======================================
form                entry of a unit                                   layers
==================  ===============================================  =======================================
``head_rank``       ``{"attn1": {"rank_qk": r, "rank_vo": r}, ...}``   q/k (QK) or v/out (VO) rows per head
``ffn_width``       ``{"ffn_width": w}``                               GEGLU rows (content + gate), down columns
``resnet_inner``    ``{"resnet_inner": n}``                            conv1, norm2, time_emb_proj, conv2 inner
``lowrank``         ``{"proj_in_rank": r}`` (factored layers only)     a :class:`LowRankProj` factor pair
==================  ===============================================  =======================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from slimexport.errors import ArtifactError, IncompatibleArtifactError
from slimexport.models.kinds import UNITS, Kind, unit_kinds
from slimexport.slim.lowrank import LowRankProj, dense_weight, factor_layer


@dataclass(frozen=True)
class SlimForm:
    read: Callable[[nn.Module, Kind, dict], None]  # adds the kind's shape to the unit's entry
    resize: Callable[[nn.Module, str, nn.Module, Kind, dict, dict], None]  # (unet, path, unit module, kind, entry, kw)


def _resized(old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A module like ``old`` (Linear, Conv2d or GroupNorm) holding the given weight and bias."""
    kw = dict(device=weight.device, dtype=old.weight.dtype)
    if isinstance(old, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, **kw)
    elif isinstance(old, nn.Conv2d):
        new = nn.Conv2d(weight.shape[1], weight.shape[0], old.kernel_size, stride=old.stride, padding=old.padding,
                        dilation=old.dilation, bias=bias is not None, padding_mode=old.padding_mode, **kw)
    elif isinstance(old, nn.GroupNorm):
        group_size = old.num_channels // old.num_groups
        new = nn.GroupNorm(weight.shape[0] // group_size, weight.shape[0], eps=old.eps, affine=True, **kw)
    else:
        raise ArtifactError(f"cannot resize a {type(old).__name__}", "the slim weights belong to another architecture")
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.requires_grad_(old.weight.requires_grad)


def replace_linears(unet: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Replace each Linear/Conv2d/GroupNorm named by ``<path>.weight`` keys with one of the given weight (and bias) shape."""
    for key, w in weights.items():
        if not key.endswith(".weight"):
            continue
        path = key[: -len(".weight")]
        parent_path, _, name = path.rpartition(".")
        parent = unet.get_submodule(parent_path)
        old = unet.get_submodule(path)
        if not isinstance(old, (nn.Linear, nn.Conv2d, nn.GroupNorm)):
            raise ArtifactError(f"{path} is a {type(old).__name__}, not a Linear/Conv2d/GroupNorm layer",
                                "the slim weights belong to another architecture")
        bias = weights.get(path + ".bias", old.bias.detach() if old.bias is not None else None)
        new = _resized(old, w.to(old.weight.dtype), None if bias is None else bias.to(old.weight.dtype))
        if name.isdigit():
            parent[int(name)] = new
        else:
            setattr(parent, name, new)


def _attention(mod: nn.Module, kind: Kind) -> tuple[str, str, nn.Module]:
    which, pair = kind.name.split(".")
    return which, pair, getattr(mod, which)


def _read_heads(mod: nn.Module, kind: Kind, entry: dict) -> None:
    which, pair, attn = _attention(mod, kind)
    entry.setdefault(which, {})[f"rank_{pair}"] = kind.layer(mod, "left").out_features // attn.heads


def _resize_heads(unet, path, mod, kind, entry, kw) -> None:
    which, pair, attn = _attention(mod, kind)
    if which not in entry:
        return
    rows = entry[which][f"rank_{pair}"] * attn.heads
    left, right = kind.layer(mod, "left"), kind.layer(mod, "right")
    shapes = {"left": (rows, left.in_features),
              "right": (right.out_features, rows) if pair == "vo" else (rows, right.in_features)}
    replace_linears(unet, {f"{path}.{kind.layers[role]}.weight": torch.empty(*s, **kw) for role, s in shapes.items()})


def _read_ffn(mod, kind, entry) -> None:
    entry["ffn_width"] = kind.layer(mod, "down").in_features


def _resize_ffn(unet, path, mod, kind, entry, kw) -> None:
    if "ffn_width" not in entry:
        return
    width, up, down = entry["ffn_width"], kind.layer(mod, "up"), kind.layer(mod, "down")
    replace_linears(unet, {  # GEGLU: content and gate rows
        f"{path}.{kind.layers['up']}.weight": torch.empty(2 * width, up.in_features, **kw),
        f"{path}.{kind.layers['up']}.bias": torch.empty(2 * width, **kw),
        f"{path}.{kind.layers['down']}.weight": torch.empty(down.out_features, width, **kw),
    })


def _read_resnet(mod, kind, entry) -> None:
    entry["resnet_inner"] = kind.layer(mod, "conv1").out_channels


def _resize_resnet(unet, path, mod, kind, entry, kw) -> None:
    inner = entry.get("resnet_inner")
    c1, c2, temb = kind.layer(mod, "conv1"), kind.layer(mod, "conv2"), kind.layer(mod, "temb")
    if inner is None or c1.out_channels == inner:
        return
    p = {role: f"{path}.{kind.layers[role]}" for role in kind.layers}
    new = {
        f"{p['conv1']}.weight": torch.empty(inner, *c1.weight.shape[1:], **kw),
        f"{p['conv1']}.bias": torch.empty(inner, **kw),
        f"{p['norm']}.weight": torch.empty(inner, **kw),
        f"{p['norm']}.bias": torch.empty(inner, **kw),
        f"{p['conv2']}.weight": torch.empty(c2.out_channels, inner, *c2.weight.shape[2:], **kw),
    }
    if temb is not None:
        new[f"{p['temb']}.weight"] = torch.empty(inner, temb.in_features, **kw)
        new[f"{p['temb']}.bias"] = torch.empty(inner, **kw)
    replace_linears(unet, new)


def _read_lowrank(mod, kind, entry) -> None:
    layer = kind.layer(mod, "layer")
    if isinstance(layer, LowRankProj):
        entry[f"{kind.name}_rank"] = layer.rank


def _resize_lowrank(unet, path, mod, kind, entry, kw) -> None:
    rank = entry.get(f"{kind.name}_rank")
    if rank is None:
        return
    parent_path, _, attr = f"{path}.{kind.layers['layer']}".rpartition(".")
    w, b = dense_weight(kind.layer(mod, "layer"))
    n_out, n_in = w.shape
    bias = None if b is None else torch.empty(n_out, **kw)
    factor_layer(unet.get_submodule(parent_path), attr, torch.empty(n_in, rank, **kw), torch.empty(rank, n_out, **kw), bias)


SLIM_FORMS: dict[str, SlimForm] = {
    "head_rank": SlimForm(_read_heads, _resize_heads),
    "ffn_width": SlimForm(_read_ffn, _resize_ffn),
    "resnet_inner": SlimForm(_read_resnet, _resize_resnet),
    "lowrank": SlimForm(_read_lowrank, _resize_lowrank),
}


def _units(unet: nn.Module):
    classes = {u.module_class: u for u in UNITS.values()}
    for path, mod in unet.named_modules():
        unit = classes.get(type(mod).__name__)
        if unit is not None:
            yield path, mod, unit


def shapes_of(unet: nn.Module) -> dict[str, dict]:
    """Per unit path, the shapes of its kinds as ``slim_plan.json`` records them (table above)."""
    out = {}
    for path, mod, unit in _units(unet):
        entry: dict = {}
        for kind in unit_kinds(unit.name):
            SLIM_FORMS[kind.slim].read(mod, kind, entry)
        if entry:
            out[path] = entry
    return out


def resize_to(unet: nn.Module, shapes: dict[str, dict]) -> None:
    """Give ``unet`` the layer shapes of a slim plan (weights uninitialised: load a state dict next)."""
    units = {path: (mod, unit) for path, mod, unit in _units(unet)}
    missing = sorted(set(shapes) - set(units))
    if missing:
        raise IncompatibleArtifactError(f"slim plan names blocks this UNet lacks ({missing[0]}, ...)",
                                        "load it with the UNet config it was made from")
    p = next(unet.parameters())
    kw = dict(dtype=p.dtype, device=p.device)
    for path, entry in shapes.items():
        mod, unit = units[path]
        for kind in unit_kinds(unit.name):
            SLIM_FORMS[kind.slim].resize(unet, path, mod, kind, entry, kw)
