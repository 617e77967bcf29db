"""Apply a slim plan to a UNet, and save/load slim UNets as folders (config + plan JSON + safetensors).

A slim UNet is an ordinary ``UNet2DConditionModel`` whose attention and feed-forward ``nn.Linear`` layers (and,
with the ``resnet`` target, ResNet inner convolutions) are narrower, with :class:`SlimAttnProcessor` installed on
every attention of its transformer blocks; with the ``proj`` target, transformer ``proj_in``/``proj_out`` layers
may be :class:`~slimexport.slim.lowrank.LowRankProj` factor pairs. Folder:

- ``config.json``: the dense UNet's diffusers config (the architecture before slimming);
- ``slim_plan.json``: per-block shapes (``rank_qk``/``rank_vo`` per head, FFN width, ResNet inner width,
  ranks of factored projections),
  provenance and digests;
- ``diffusion_pytorch_model.safetensors``: the slim weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from slimexport._version import __version__
from slimexport.artifacts import atomic_dir, load_tensors, read_json, save_tensors, sha256_file, write_json
from slimexport.cache import MANIFEST
from slimexport.errors import ArtifactError, IncompatibleArtifactError, UsageError
from slimexport.models.arch import transformer_blocks
from slimexport.models.bundle import move
from slimexport.slim.attention import SlimAttnProcessor
from slimexport.slim.lowrank import LowRankProj, dense_weight, factor_layer

SLIM_FORMAT = "slimexport.slim/1"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PLAN_NAME = "slim_plan.json"
SLIM_DIR = "slim_unet"  # the slim UNet folder inside a compress/build output folder


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


def default_attention_kernel():
    """The decoupled-head attention through the kernel dispatch (Triton on CUDA where faster, else SDPA)."""
    from slimexport.kernels import decoupled_attention

    return decoupled_attention


def install_processors(unet: nn.Module, kernel="auto") -> None:
    """Put :class:`SlimAttnProcessor` (original scale kept) on every attention of every transformer block.

    ``kernel="auto"`` routes attention through :func:`slimexport.kernels.decoupled_attention` (which picks the
    faster of Triton and SDPA per shape on CUDA, SDPA on the CPU and under export); ``None`` always uses SDPA.
    """
    if kernel == "auto":
        kernel = default_attention_kernel()
    for _, block in transformer_blocks(unet):
        for attn in (block.attn1, getattr(block, "attn2", None)):
            if attn is not None:
                attn.set_processor(SlimAttnProcessor(attn.scale, kernel=kernel))


def shapes_of(unet: nn.Module) -> dict[str, dict]:
    """Per-block shapes: ``{path: {"attn1": {"rank_qk", "rank_vo"}, "attn2": {...}, "ffn_width": w}}``."""
    out = {}
    for path, block in transformer_blocks(unet):
        entry = {}
        for name in ("attn1", "attn2"):
            attn = getattr(block, name)
            entry[name] = {"rank_qk": attn.to_q.out_features // attn.heads, "rank_vo": attn.to_v.out_features // attn.heads}
        entry["ffn_width"] = block.ff.net[2].in_features
        out[path] = entry
    for path, mod in unet.named_modules():
        if type(mod).__name__ == "ResnetBlock2D":
            out[path] = {"resnet_inner": mod.conv1.out_channels}
        elif type(mod).__name__ == "Transformer2DModel":
            ranks = {f"{k}_rank": getattr(mod, k).rank for k in ("proj_in", "proj_out") if isinstance(getattr(mod, k, None), LowRankProj)}
            if ranks:
                out[path] = ranks
    return out


def resize_to(unet: nn.Module, shapes: dict[str, dict]) -> None:
    """Give ``unet`` the layer shapes of a slim plan (weights uninitialised: load a state dict next)."""
    blocks = dict(transformer_blocks(unet))
    known = set(blocks) | {n for n, m in unet.named_modules() if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel")}
    missing = sorted(set(shapes) - known)
    if missing:
        raise IncompatibleArtifactError(f"slim plan names blocks this UNet lacks ({missing[0]}, ...)", "load it with the UNet config it was made from")
    p = next(unet.parameters())
    for path, entry in shapes.items():
        if "resnet_inner" in entry:
            _resize_resnet(unet, path, entry["resnet_inner"], p)
            continue
        if "proj_in_rank" in entry or "proj_out_rank" in entry:
            _factor_projections(unet, path, entry, p)
            continue
        block = blocks[path]
        for name in ("attn1", "attn2"):
            attn = getattr(block, name)
            rqk, rvo = entry[name]["rank_qk"] * attn.heads, entry[name]["rank_vo"] * attn.heads
            out_dim = attn.to_out[0].out_features
            new = {
                "to_q.weight": torch.empty(rqk, attn.to_q.in_features, dtype=p.dtype, device=p.device),
                "to_k.weight": torch.empty(rqk, attn.to_k.in_features, dtype=p.dtype, device=p.device),
                "to_v.weight": torch.empty(rvo, attn.to_v.in_features, dtype=p.dtype, device=p.device),
                "to_out.0.weight": torch.empty(out_dim, rvo, dtype=p.dtype, device=p.device),
            }
            replace_linears(unet, {f"{path}.{name}.{k}": v for k, v in new.items()})
        width = entry["ffn_width"]
        proj = block.ff.net[0].proj
        c = proj.in_features
        replace_linears(unet, {
            f"{path}.ff.net.0.proj.weight": torch.empty(2 * width, c, dtype=p.dtype, device=p.device),
            f"{path}.ff.net.0.proj.bias": torch.empty(2 * width, dtype=p.dtype, device=p.device),
            f"{path}.ff.net.2.weight": torch.empty(block.ff.net[2].out_features, width, dtype=p.dtype, device=p.device),
        })


def _factor_projections(unet: nn.Module, path: str, entry: dict, p: torch.Tensor) -> None:
    mod = unet.get_submodule(path)
    kw = dict(dtype=p.dtype, device=p.device)
    for kind in ("proj_in", "proj_out"):
        rank = entry.get(f"{kind}_rank")
        if rank is None:
            continue
        w, b = dense_weight(getattr(mod, kind))
        n_out, n_in = w.shape
        bias = None if b is None else torch.empty(n_out, **kw)
        factor_layer(mod, kind, torch.empty(n_in, rank, **kw), torch.empty(rank, n_out, **kw), bias)


def _resize_resnet(unet: nn.Module, path: str, inner: int, p: torch.Tensor) -> None:
    block = unet.get_submodule(path)
    if block.conv1.out_channels == inner:
        return
    kw = dict(dtype=p.dtype, device=p.device)
    c1, c2 = block.conv1, block.conv2
    new = {
        f"{path}.conv1.weight": torch.empty(inner, *c1.weight.shape[1:], **kw),
        f"{path}.conv1.bias": torch.empty(inner, **kw),
        f"{path}.norm2.weight": torch.empty(inner, **kw),
        f"{path}.norm2.bias": torch.empty(inner, **kw),
        f"{path}.conv2.weight": torch.empty(c2.out_channels, inner, *c2.weight.shape[2:], **kw),
    }
    if block.time_emb_proj is not None:
        new[f"{path}.time_emb_proj.weight"] = torch.empty(inner, block.time_emb_proj.in_features, **kw)
        new[f"{path}.time_emb_proj.bias"] = torch.empty(inner, **kw)
    replace_linears(unet, new)


def _output_root(path: Path) -> Path | None:
    """The ``slimexport compress/build --out`` folder that ``path`` is or whose ``slim_unet/`` it is; ``None`` if neither."""
    if (path / MANIFEST).is_file() or (path / SLIM_DIR).is_dir():
        return path
    if path.name == SLIM_DIR and (path.parent / MANIFEST).is_file():
        return path.parent
    return None


def _rerun_fix(root: Path) -> str:
    return f"rerun the slimexport compress (or build) command that wrote {root}, with the same --out (it rebuilds what is missing)"


_PASS_FIX = "pass the folder that slimexport compress --out (or build --out) wrote, or its slim_unet/"


def save_slim_unet(unet: nn.Module, out_dir: str | Path, plan: dict | None = None) -> Path:
    """Write a slim UNet folder atomically: ``load_slim_unet(out_dir)`` gives the UNet back, with its current weights.

    Saves a UNet from :func:`load_slim_unet` again after changes (``save_slim_unet(unet, "my_slim")``); the shapes
    and the weights' sha256 are those of ``unet``.

    Args:
        unet: a slim (or dense) ``UNet2DConditionModel``, on any device and in any dtype.
        out_dir: a new or empty folder, or a slim UNet folder to replace.
        plan: provenance stored in ``slim_plan.json`` (compress stores the rank plan's; ``None`` stores nothing).

    Raises:
        UsageError: ``out_dir`` is a file, a folder of other files, or a compress/build folder (its manifest
            records the weights there: save elsewhere).
    """
    out_dir = Path(out_dir)
    root = _output_root(out_dir)
    if root == out_dir:
        raise UsageError(f"{out_dir} is a slimexport output folder (its manifest records the slim UNet in "
                         f"{out_dir / SLIM_DIR}): saving there would replace the whole folder",
                         "save to a new folder and load it from there")
    if out_dir.is_file() or (out_dir.is_dir() and root is None and not (out_dir / PLAN_NAME).exists()
                             and any(out_dir.iterdir())):
        raise UsageError(f"{out_dir} is {'a file' if out_dir.is_file() else 'a folder of other files'}, not a slim "
                         "UNet folder: saving would replace it", "save to a new or empty folder")
    with atomic_dir(out_dir) as tmp:
        config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        config = json.loads(json.dumps(config, default=list))
        write_json(tmp / "config.json", config)
        digest = save_tensors(tmp / WEIGHTS_NAME, unet.state_dict(), metadata={"format": SLIM_FORMAT})
        write_json(tmp / PLAN_NAME, {
            "format": SLIM_FORMAT,
            "slimexport_version": __version__,
            "shapes": shapes_of(unet),
            "weights": {"file": WEIGHTS_NAME, "sha256": digest},
            "params": sum(p.numel() for p in unet.parameters()),
            "plan": plan or {},
        })
    return out_dir


def read_slim_plan(path: str | Path) -> dict:
    meta = read_json(Path(path) / PLAN_NAME, "slim plan")
    if meta.get("format") != SLIM_FORMAT:
        raise IncompatibleArtifactError(
            f"{path} has slim format {meta.get('format')!r}; this slimexport {__version__} reads {SLIM_FORMAT!r}",
            "rebuild the slim UNet with this version (slimexport compress)",
        )
    return meta


def slim_folder(path: str | Path) -> Path:
    """The slim UNet folder ``path`` names: itself (it holds ``slim_plan.json``), or the ``slim_unet/`` of the folder
    ``slimexport compress --out`` or ``build --out`` wrote.

    Raises:
        UsageError: ``path`` does not exist, is a file, or is a dense UNet or pipeline folder.
        ArtifactError: ``path`` is (in) a compress/build folder that lacks its slim UNet files, or holds no slim UNet.
    """
    path = Path(path)
    root = _output_root(path)
    if root is not None:
        path = root / SLIM_DIR
        missing = [n for n in (PLAN_NAME, "config.json", WEIGHTS_NAME) if not (path / n).exists()]
        if missing:
            what = f"{path} does not exist" if not path.is_dir() else f"{path} is missing {', '.join(missing)}"
            raise ArtifactError(f"slim UNet folder {what}", _rerun_fix(root))
        return path
    if (path / PLAN_NAME).exists():
        return path
    if not path.exists():
        raise UsageError(f"slim UNet folder {path} does not exist", _PASS_FIX)
    if not path.is_dir():
        raise UsageError(f"{path} is a file, not a slim UNet folder", _PASS_FIX)
    if (path / "model_index.json").exists():
        raise UsageError(f"{path} is a diffusers pipeline folder, not a slim UNet", _PASS_FIX)
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        raise UsageError(f"{path} is a UNet folder without {PLAN_NAME}, not a slim one",
                         "load a dense UNet with UNet2DConditionModel.from_pretrained; " + _PASS_FIX)
    raise ArtifactError(f"{path} holds no slim UNet: {PLAN_NAME} is missing and there is no {SLIM_DIR}/ folder", _PASS_FIX)


def load_slim_unet(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, check: bool = True):
    """Rebuild a slim UNet saved by :func:`save_slim_unet` (``slimexport compress`` and ``build`` save one).

    The result drops into a diffusers pipeline (``pipe.unet = load_slim_unet(...)``).

    Args:
        path: the folder ``slimexport compress --out`` or ``build --out`` wrote, its ``slim_unet/``, or a folder
            :func:`save_slim_unet` wrote.
        check: verify the weights' sha256 against ``slim_plan.json`` first.

    Raises:
        UsageError: ``path`` is not a folder, or is a dense UNet or pipeline folder (see :func:`slim_folder`).
        ArtifactError: the folder is incomplete, or its weights fail their sha256 check.
    """
    from diffusers import UNet2DConditionModel

    path = slim_folder(path)
    meta = read_slim_plan(path)
    config = read_json(path / "config.json", "UNet config")
    weights_file = path / meta["weights"]["file"]
    state = load_tensors(weights_file, meta["weights"]["sha256"] if check else None, what="slim weights")
    unet = UNet2DConditionModel.from_config(config)
    resize_to(unet, meta["shapes"])
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ArtifactError(f"slim weights in {weights_file} do not fit the plan's shapes ({str(err).splitlines()[0]})",
                            "rebuild the slim UNet (slimexport compress)") from err
    install_processors(unet)
    return move(unet, device, dtype).eval().requires_grad_(False)


def slim_weights_sha256(path: str | Path) -> str:
    return sha256_file(Path(path) / WEIGHTS_NAME)
