"""Single-file checkpoints: one ``.safetensors`` file in the original (LDM/CompVis) layout, as most SD1.x/SD2.x
fine-tunes ship (``--model path/to/model.safetensors``).

The architecture is a registry config, never downloaded: detected from the file's keys (SD1 -> ``sd15``, SD2 ->
``sd21-base``, or ``tiny``) or named with ``config_of``. diffusers' single-file converters
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``) rename the weights, which then load strictly
(every weight present and of its shape) into that config. A file holds no tokenizer: the CLIP one comes from the
local Hugging Face cache. Only safetensors are read; pickled ``.ckpt``/``.pt``/``.bin`` files are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from slimexport.errors import UsageError
from slimexport.models.build import (
    build_text_encoder,
    build_unet,
    build_vae,
    char_tokenizer,
    stand_in_text_encoder,
)
from slimexport.models.bundle import CLIPPromptEncoder, ModelBundle
from slimexport.models.registry import ModelSpec, check_supported_unet, checkpoint_configs, get_spec

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1: a transformers CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2: the OpenCLIP ViT-H text tower
SDXL_PREFIX = "conditioner."  # SDXL's two text encoders (and its size/crop embedders)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# The registry configs a file's keys can select, in this order (sd14 has sd15's architecture; sd15 names it).
FAMILIES = ("sd15", "sd21-base", "tiny")


def _config_of_fix() -> str:
    return f"name its architecture with --config-of ({', '.join(checkpoint_configs())}), or convert the file to a diffusers folder"


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the file (read from its header: no weights are read).

    Raises:
        UsageError: a pickle (never loaded), or not a safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(f"{path} is a pickled checkpoint ({path.suffix}): slimexport never loads pickles",
                         "convert it to .safetensors once where you trust the file (e.g. load it with torch and save it "
                         "with safetensors.torch.save_file), then pass that file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise UsageError(f"{path} is not a readable .safetensors file ({err})",
                         "pass a .safetensors checkpoint or a diffusers folder") from err


def read_parts(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the parts loaded here (UNet, VAE, text encoder): an EMA copy or other extras are not read."""
    from safetensors import safe_open

    parts = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPEN_CLIP_PREFIX)
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(parts)}


def _first(shapes: dict, suffix: str) -> tuple[int, ...] | None:
    return next((s for k, s in sorted(shapes.items()) if k.startswith(UNET_PREFIX) and k.endswith(suffix)), None)


def check_unet_keys(shapes: dict, where: Path) -> tuple[int, int, bool]:
    """Refuse a file that holds no SD1.x/SD2.x text-to-image UNet; return its ``(conv_in width, context width,
    linear proj_in)``, the shapes that tell the registry's architectures apart.

    Raises:
        UsageError: no LDM UNet keys (another layout), or an SDXL, class-conditioned or inpainting UNet.
    """
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        diffusers_layout = "conv_in.weight" in shapes or any(k.startswith("down_blocks.") for k in shapes)
        raise UsageError(f"{where} has no {UNET_PREFIX}* weights: not an SD1.x/SD2.x checkpoint in the original layout"
                         + (" (its keys are diffusers' UNet layout)" if diffusers_layout else ""),
                         "put a diffusers UNet in a folder beside its config.json (save_pretrained), or pass an "
                         "SD1.x/SD2.x .safetensors checkpoint")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    conv_out = shapes.get(UNET_PREFIX + "out.2.weight")
    pseudo = {"in_channels": conv_in[1] if conv_in else 4, "out_channels": conv_out[0] if conv_out else 4}
    if any(k.startswith(SDXL_PREFIX) for k in shapes):
        pseudo["addition_embed_type"] = "text_time"
    elif any(k.startswith(UNET_PREFIX + "label_emb.") for k in shapes):
        pseudo["class_embed_type"] = "label_emb"
    check_supported_unet(pseudo, where)
    to_k, proj_in = _first(shapes, "attn2.to_k.weight"), _first(shapes, ".proj_in.weight")
    if conv_in is None or to_k is None or proj_in is None:
        raise UsageError(f"{where}: its UNet has no input convolution or no cross-attention "
                         f"({UNET_PREFIX}input_blocks.0.0.weight, ...attn2.to_k.weight): not an SD1.x/SD2.x UNet",
                         "pass an SD1.x/SD2.x .safetensors checkpoint")
    return conv_in[0], to_k[1], len(proj_in) == 2


def detect_family(shapes: dict, where: Path) -> str:
    """The registry name (one of :data:`FAMILIES`) whose UNet has the file's conv_in width, context width and
    projection kind: SD1 (320, 768, convolution), SD2 (320, 1024, linear), tiny (32, 32, convolution).

    Raises:
        UsageError: an unsupported UNet, or one that no registry architecture matches.
    """
    sig = check_unet_keys(shapes, where)
    for name in FAMILIES:
        cfg = get_spec(name).unet_config
        if (cfg["block_out_channels"][0], cfg["cross_attention_dim"], bool(cfg.get("use_linear_projection"))) == sig:
            return name
    raise UsageError(f"{where}: its UNet (conv_in width {sig[0]}, context width {sig[1]}, "
                     f"{'linear' if sig[2] else 'convolution'} proj_in) matches no registry architecture", _config_of_fix())


def _load_strict(module: torch.nn.Module, state: dict, part: str, where: Path, fix: str) -> None:
    """``module.load_state_dict(state)``, every weight present and of its shape, or a one-line error."""
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state) if tuple(want[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        found = ", ".join(f"{what} {keys[0]}{f' (+{len(keys) - 1})' if len(keys) > 1 else ''}"
                          for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        raise UsageError(f"{where}: its {part} weights do not fit the architecture ({found})", fix)
    module.load_state_dict(state, strict=True)


def _convert(fn, part: str, where: Path, fix: str, *args, **kwargs) -> dict:
    """A diffusers converter's result, or a one-line error when the file's keys do not follow the layout."""
    try:
        return fn(*args, **kwargs)
    except (KeyError, IndexError, ValueError, AttributeError) as err:
        raise UsageError(f"{where}: its {part} weights are not in the layout diffusers converts ({type(err).__name__}: {err})",
                         fix) from err


def _flatten_text_keys(model, state: dict) -> dict:
    """Converted keys are ``text_model.*``; transformers >= 5.6 ``CLIPTextModel`` has no ``text_model`` wrapper.
    Old checkpoints also store ``position_ids``, a buffer transformers no longer saves."""
    if not hasattr(model, "text_model"):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    keep = set(model.state_dict())
    return {k: v for k, v in state.items() if k in keep or not k.endswith("position_ids")}


def cached_tokenizer(spec: ModelSpec, where: Path):
    """The CLIP tokenizer of ``spec``'s pipeline from the local Hugging Face cache (offline), or ``tiny``'s own.

    Raises:
        UsageError: it is not cached, with the command that caches it.
    """
    if spec.hub_id is None:
        return char_tokenizer()
    from transformers import CLIPTokenizer

    fix = (f"cache it once where the hub is reachable (hf download {spec.hub_id} --include 'tokenizer/*') and pass "
           "the file again")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(spec.hub_id, local_files_only=True, allow_patterns=["tokenizer/*"])) / "tokenizer"
    except Exception as err:  # noqa: BLE001 - any miss in the offline cache means "not cached"
        raise UsageError(f"{where} holds no tokenizer, and {spec.name}'s ({spec.hub_id}) is not in the local Hugging "
                         "Face cache", fix) from err
    if not (folder / "vocab.json").is_file():
        raise UsageError(f"{where} holds no tokenizer, and {folder} has no vocab.json", fix)
    try:
        return CLIPTokenizer.from_pretrained(folder, model_max_length=spec.text_config["max_position_embeddings"])
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the CLIP tokenizer in {folder} ({err})", fix) from err


def check_config_of(name: str) -> ModelSpec:
    """The registry spec ``--config-of`` names.

    Raises:
        UsageError: not one of :func:`~slimexport.models.registry.checkpoint_configs`.
    """
    if name not in checkpoint_configs():
        raise UsageError(f"--config-of {name!r} is not a registry architecture of an SD1.x/SD2.x checkpoint",
                         f"use one of {', '.join(checkpoint_configs())}")
    return get_spec(name)


def load_single_file(path: Path, name: str, config_of: str | None = None) -> ModelBundle:
    """A single-file LDM checkpoint as a :class:`ModelBundle` (CPU, fp32, eval).

    Args:
        path: the ``.safetensors`` file.
        name: what the user passed to ``--model``.
        config_of: registry name of the architecture (``None``: detected from the keys, :func:`detect_family`).

    Raises:
        UsageError: a pickle or unreadable file, an unsupported or unknown UNet, weights that do not fit the
            architecture, or (a file with a text encoder) no cached tokenizer.
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    path = path.resolve()
    shapes = read_shapes(path)
    if config_of is None:
        family = detect_family(shapes, path)
        fix = _config_of_fix()
        log.info("%s: a %s checkpoint (from its keys)", path, family)
    else:
        check_unet_keys(shapes, path)
        family = config_of
        fix = f"--config-of {config_of} is not this file's architecture: " + _config_of_fix()
    spec = check_config_of(family)
    has_text = any(k.startswith((CLIP_PREFIX, OPEN_CLIP_PREFIX)) for k in shapes)
    tokenizer = cached_tokenizer(spec, path) if has_text else None  # before the weights: a missing one fails fast
    ckpt = read_parts(path)
    unet = build_unet(spec.unet_config)
    _load_strict(unet, _convert(convert_ldm_unet_checkpoint, "UNet", path, fix, ckpt, spec.unet_config), "UNet", path, fix)
    if has_text:
        text_encoder = build_text_encoder(spec.text_config, tokenizer)
        if any(k.startswith(CLIP_PREFIX) for k in ckpt):
            state = _convert(convert_ldm_clip_checkpoint, "text encoder", path, fix, ckpt)
        else:
            state = _convert(convert_open_clip_checkpoint, "text encoder", path, fix, text_encoder, ckpt, prefix=OPEN_CLIP_PREFIX)
        _load_strict(text_encoder, _flatten_text_keys(text_encoder, state), "text encoder", path, fix)
    else:
        log.warning("%s holds no text encoder: calibration conditions on a random text encoder of width %d; "
                    "pass a checkpoint with its text encoder for real prompt conditioning", path, unet.config.cross_attention_dim)
        tokenizer, text_encoder = stand_in_text_encoder(unet.config.cross_attention_dim)
    components = {"tokenizer": tokenizer, "text_encoder": text_encoder}
    if spec.vae_config is not None and any(k.startswith(VAE_PREFIX) for k in ckpt):
        vae = build_vae(spec.vae_config)
        _load_strict(vae, _convert(convert_ldm_vae_checkpoint, "VAE", path, fix, ckpt, spec.vae_config), "VAE", path, fix)
        components["vae"] = vae
    return ModelBundle(name=name, source=f"local:{path}", unet=unet, encoder=CLIPPromptEncoder(tokenizer, text_encoder),
                       scheduler_config=dict(spec.scheduler), image_size=spec.default_image,
                       vae_scale_factor=spec.vae_scale_factor, components=components)
