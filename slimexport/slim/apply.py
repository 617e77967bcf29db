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
from slimexport.errors import ArtifactError, UsageError
from slimexport.models.arch import transformer_blocks
from slimexport.models.bundle import move
from slimexport.plan import SLIM_FORMAT, SlimPlan
from slimexport.slim.attention import SlimAttnProcessor
from slimexport.slim.shapes import replace_linears, resize_to, shapes_of  # noqa: F401 - re-exported

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PLAN_NAME = "slim_plan.json"
SLIM_DIR = "slim_unet"  # the slim UNet folder inside a compress/build output folder


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
        write_json(tmp / PLAN_NAME, SlimPlan(shapes=shapes_of(unet), weights={"file": WEIGHTS_NAME, "sha256": digest},
                                             params=sum(p.numel() for p in unet.parameters()), plan=dict(plan or {}),
                                             slimexport_version=__version__).to_dict())
    return out_dir


def read_slim_plan(path: str | Path) -> SlimPlan:
    return SlimPlan.from_dict(read_json(Path(path) / PLAN_NAME, "slim plan"), where=str(path))


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
