"""Model loading: registry name → built-in model, random weights, local folder or file, local HF cache, hub.

Lookup order for ``--model X``: built-in (``tiny``, ``digits``) → ``--random-weights`` (registry config) →
local folder, or single-file checkpoint (``models/single_file.py``) → local Hugging Face cache (offline) → the hub,
only if it answers within seconds. Weights are read from safetensors only: a folder with only pickled ``.bin``
weights is refused; one with a single variant (``*.fp16.safetensors``) and no default weights loads that variant.
Only SD1.x/SD2.x text-to-image UNets load.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shlex
import socket
from pathlib import Path

import torch

from slimexport.artifacts import sha256_json
from slimexport.errors import ModelNotFoundError, UsageError
from slimexport.models.build import (
    build_text_encoder,
    build_tiny_vae,
    build_unet,
    char_tokenizer,
    stand_in_text_encoder,
)
from slimexport.models.bundle import CLIPPromptEncoder, ModelBundle, move
from slimexport.models.digits import load_digits
from slimexport.models.registry import (
    SD_SCHEDULER,
    SUPPORTED_FIX,
    TINY_TEXT,
    ModelSpec,
    check_supported_unet,
    get_spec,
    names,
)
from slimexport.models.single_file import PICKLE_SUFFIXES, load_single_file

log = logging.getLogger(__name__)

HUB_HOST = ("huggingface.co", 443)
HUB_PROBE_SECONDS = 3.0
# What a pipeline folder needs here: configs and the safetensors weights (default variant, shards included), not
# the .bin pickles, fp16/non_ema variants or ONNX/Flax copies that hub repos also hold (SD1.4: ~4 GB, not ~20 GB).
# vae/config.json gives the VAE scale factor. Also the file list of the download command in error messages.
PIPELINE_PARTS = ["model_index.json", "tokenizer/*", "scheduler/*", "vae/config.json",
                  "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                  "unet/diffusion_pytorch_model-*-of-*.safetensors", "unet/diffusion_pytorch_model.safetensors.index.json",
                  "text_encoder/config.json", "text_encoder/model.safetensors",
                  "text_encoder/model-*-of-*.safetensors", "text_encoder/model.safetensors.index.json"]


def _random_bundle(spec: ModelSpec, source: str, seed: int = 0) -> ModelBundle:
    tokenizer = char_tokenizer()
    text_encoder = build_text_encoder(spec.text_config or TINY_TEXT, tokenizer, seed=seed + 1)
    components = {"tokenizer": tokenizer, "text_encoder": text_encoder}
    if spec.name == "tiny":
        components["vae"] = build_tiny_vae(seed + 2)
    import diffusers
    import transformers

    recipe = sha256_json({"unet": spec.unet_config, "text": spec.text_config, "seed": seed, "tokenizer": "char-v1",
                          "scheduler": dict(spec.scheduler),
                          "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__})
    return ModelBundle(
        name=spec.name, source=source, unet=build_unet(spec.unet_config, seed), encoder=CLIPPromptEncoder(tokenizer, text_encoder),
        scheduler_config=dict(spec.scheduler), image_size=spec.default_image, vae_scale_factor=spec.vae_scale_factor,
        components=components, fingerprint=f"recipe:{recipe}",
    )


def _read_json_object(path: Path) -> dict:
    """The JSON object in ``path``, or a one-line error naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is not a valid JSON file ({err})", "re-download the model or restore that file") from err
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a JSON {type(data).__name__}, not an object",
                         "re-download the model or restore that file")
    return data


def _weights_variant(folder: Path, stem: str) -> str | None:
    """Which safetensors weights ``from_pretrained`` should read in ``folder``: ``None`` for the default
    ``{stem}.safetensors`` (or its shards), else the only variant present (``{stem}.fp16.safetensors``,
    as ``save_pretrained(variant="fp16")`` writes).

    Raises:
        UsageError: no safetensors weights of that name (pickles are never loaded), or several variants and no
            default to choose.
    """
    if (folder / f"{stem}.safetensors").exists() or (folder / f"{stem}.safetensors.index.json").exists():
        return None
    # diffusers/transformers variant names: stem.V.safetensors, stem.V-00001-of-00002.safetensors, stem.safetensors.index.V.json
    pattern = re.compile(rf"{re.escape(stem)}\.(?:([^.]+?)(?:-\d+-of-\d+)?\.safetensors|safetensors\.index\.([^.]+)\.json)")
    variants = sorted({m.group(1) or m.group(2) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))})
    if len(variants) == 1:
        log.info("%s has only the '%s' variant of its weights: loading it", folder, variants[0])
        return variants[0]
    if variants:
        raise UsageError(f"{folder} has no default weights {stem}.safetensors, only the variants {', '.join(variants)}",
                         "keep the files of one variant in that folder, or save the default weights there "
                         "(save_pretrained without variant=)")
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        raise UsageError(f"{folder} has no {stem}.safetensors weights (it holds {', '.join(others)})",
                         "re-download the model or pass a complete folder")
    if any(folder.glob("*.bin")):
        raise UsageError(f"{folder} has no .safetensors weights (pickled .bin files are never loaded)",
                         "convert them once with diffusers or transformers (save_pretrained(..., safe_serialization=True)) "
                         "and pass the new folder")
    raise UsageError(f"{folder} has no .safetensors weights (no {stem}.safetensors)",
                     "re-download the model or pass a complete folder")


def _first_line(err: BaseException) -> str:
    """The line of ``err`` that says what is wrong, without advice to load mismatched weights anyway."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    line = next((ln for ln in lines if ln.startswith("size mismatch")), lines[0] if lines else type(err).__name__)
    return line.split(" You may consider")[0].split(" If you want to instead")[0].rstrip(". ")


_RESAVE_FIX = "re-download the model or re-save it with save_pretrained(..., safe_serialization=True)"


def _from_pretrained(cls, path: Path, fix: str | None = None, **kwargs):
    """``cls.from_pretrained(path)`` in fp32, turning a broken folder (unreadable config or weights, a config that does
    not match the weights or has a value of the wrong type) into a one-line error."""
    from safetensors import SafetensorError

    try:
        model = cls.from_pretrained(path, **kwargs)
    except (RuntimeError, ValueError) as err:
        if "size mismatch" not in str(err) and "expected shape" not in str(err):  # torch's / diffusers' wording
            if isinstance(err, RuntimeError):
                raise
            raise UsageError(f"cannot load {cls.__name__} from {path} ({_first_line(err)})", fix or _RESAVE_FIX) from err
        raise UsageError(f"cannot load {cls.__name__} from {path}: its config.json does not match its weights "
                         f"({_first_line(err)})",
                         "restore the config.json saved with these weights, or re-download the model") from err
    except TypeError as err:  # a config value of the wrong type reaches a constructor
        raise UsageError(f"cannot load {cls.__name__} from {path}: a config.json value has the wrong type "
                         f"({_first_line(err)})", "correct config.json, or re-download the model") from err
    except (OSError, SafetensorError) as err:
        raise UsageError(f"cannot load {cls.__name__} from {path} ({_first_line(err)})", fix or _RESAVE_FIX) from err
    # transformers >= 5 keeps a checkpoint's own dtype (fp16 variants); everything here runs in fp32
    return move(model, dtype=torch.float32) if isinstance(model, torch.nn.Module) else model


def _load_weights(cls, folder: Path, stem: str):
    """``cls`` from the safetensors weights in ``folder`` (its one variant if the default file is absent), eval, fp32."""
    variant = _weights_variant(folder, stem)
    extra = {"variant": variant} if variant else {}
    return _from_pretrained(cls, folder, use_safetensors=True, **extra).eval().requires_grad_(False)


def _vae_scale_factor(vae_dir: Path) -> int:
    """Pixels per latent cell as diffusers computes it, ``2 ** (len(block_out_channels) - 1)``; 8 (SD) without a VAE config."""
    if not (vae_dir / "config.json").exists():
        return 8
    channels = _read_json_object(vae_dir / "config.json").get("block_out_channels")
    if not isinstance(channels, list) or not channels:
        raise UsageError(f"{vae_dir / 'config.json'}: block_out_channels={channels!r} is not a non-empty list",
                         "re-download the model or restore that file")
    return 2 ** (len(channels) - 1)


def _load_folder(folder: Path, name: str, source: str) -> ModelBundle:
    """A diffusers pipeline folder (``model_index.json``) or a UNet folder (``config.json`` of a UNet)."""
    from diffusers import UNet2DConditionModel

    folder = folder.resolve()
    if (folder / "slim_plan.json").exists():
        raise UsageError(f"{folder} is a slim UNet folder, not a dense model", "pass the dense model it was made from")
    if not (folder / "model_index.json").exists() and (folder / "config.json").exists() and (folder.parent / "model_index.json").exists():
        folder = folder.parent  # a pipeline's unet/ subfolder: use the whole pipeline (text encoder for calibration)
    if (folder / "model_index.json").exists():
        index = _read_json_object(folder / "model_index.json")
        second = [k for k in ("text_encoder_2", "tokenizer_2") if index.get(k) not in (None, [None, None])]
        if second:
            raise UsageError(f"{folder}: a pipeline with {' and '.join(second)} (a second text encoder, as in SDXL) "
                             "is not supported", SUPPORTED_FIX)
        unet_dir = folder / "unet"
        if not unet_dir.is_dir():
            raise UsageError(f"pipeline folder {folder} has no unet/ subfolder", "pass a complete diffusers pipeline folder")
        if (unet_dir / "config.json").exists():
            check_supported_unet(_read_json_object(unet_dir / "config.json"), unet_dir)
        _weights_variant(unet_dir, "diffusion_pytorch_model")  # no usable weights: say so before the other parts
        for part in ("text_encoder", "tokenizer"):
            if not (folder / part).is_dir():
                raise UsageError(f"pipeline folder {folder} has no {part}/ subfolder",
                                 "pass a complete diffusers pipeline folder (unet/, text_encoder/, tokenizer/, scheduler/)")
        vocab = [n for n in ("vocab.json", "tokenizer.json") if (folder / "tokenizer" / n).is_file()]
        if not vocab:  # an empty tokenizer/ loads as a 2-token tokenizer: every prompt would be the same
            raise UsageError(f"{folder / 'tokenizer'} has no vocab.json or tokenizer.json",
                             "re-download the tokenizer/ folder (vocab.json and merges.txt, or tokenizer.json)")
        unet = _load_weights(UNet2DConditionModel, unet_dir, "diffusion_pytorch_model")
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = _from_pretrained(CLIPTokenizer, folder / "tokenizer",
                                     "re-download the tokenizer/ folder (vocab.json and merges.txt, or tokenizer.json)")
        text_encoder = _load_weights(CLIPTextModel, folder / "text_encoder", "model")
        components = {"tokenizer": tokenizer, "text_encoder": text_encoder}
        vae_dir = folder / "vae"
        vae_scale = _vae_scale_factor(vae_dir)
        if vae_dir.is_dir() and any(vae_dir.glob("*.safetensors")):
            from diffusers import AutoencoderKL

            components["vae"] = _load_weights(AutoencoderKL, vae_dir, "diffusion_pytorch_model")
        sched_cfg = _scheduler_config(folder / "scheduler")
        encoder = CLIPPromptEncoder(tokenizer, text_encoder)
        unet_dir_str = str(unet_dir)
    elif (folder / "config.json").exists():
        check_supported_unet(_read_json_object(folder / "config.json"), folder)
        unet = _load_weights(UNet2DConditionModel, folder, "diffusion_pytorch_model")
        log.warning(
            "%s is a UNet-only folder: calibration conditions on a random text encoder of width %d; "
            "pass the pipeline folder for real prompt conditioning", folder, unet.config.cross_attention_dim,
        )
        tokenizer, text_encoder = stand_in_text_encoder(unet.config.cross_attention_dim)
        components = {"tokenizer": tokenizer, "text_encoder": text_encoder}
        encoder = CLIPPromptEncoder(tokenizer, text_encoder)
        sched_cfg, vae_scale, unet_dir_str = dict(SD_SCHEDULER), 8, str(folder)
    else:
        raise UsageError(f"{folder} is not a diffusers folder (no model_index.json or config.json)",
                         "pass a StableDiffusionPipeline folder or its unet/ subfolder")
    size = int(unet.config.sample_size) * vae_scale
    return ModelBundle(name=name, source=source, unet=unet, encoder=encoder, scheduler_config=sched_cfg,
                       image_size=(size, size), vae_scale_factor=vae_scale, components=components,
                       unet_source_dir=unet_dir_str)


def _scheduler_config(folder: Path) -> dict:
    """The pipeline's sampler settings as a DDIM config: every key of ``scheduler_config.json`` that DDIM takes
    (clip_sample, set_alpha_to_one, timestep_spacing, rescale_betas_zero_snr, trained_betas, ...) over SD's
    schedule, which also fills the keys the file leaves out (DDIM's own defaults would clip SD latents)."""
    from diffusers import DDIMScheduler

    cfg = dict(SD_SCHEDULER)
    path = folder / "scheduler_config.json"
    if path.exists():
        src = _read_json_object(path)
        known = set(inspect.signature(DDIMScheduler.__init__).parameters) - {"self"}
        cfg.update({k: v for k, v in src.items() if k in known})
        try:
            DDIMScheduler.from_config(cfg).set_timesteps(10)  # bad spacing or betas fail here, not mid-calibration
        except (ValueError, TypeError, NotImplementedError) as err:
            raise UsageError(f"{path} is not a usable DDIM schedule ({_first_line(err)})",
                             "correct that file or re-download the model") from err
    return cfg


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """One TCP connect to the hub; ``False`` within ``timeout`` seconds when there is no route."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def _from_cache(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, local_files_only=True, allow_patterns=PIPELINE_PARTS)
    except Exception:  # noqa: BLE001 - any miss in the offline cache means "not cached"
        return None
    p = Path(path)
    return p if (p / "model_index.json").exists() or (p / "config.json").exists() else None


def download_command(repo_id: str) -> str:
    """The ``hf download`` command that fetches what the loader reads of ``repo_id`` (PIPELINE_PARTS) into DIR."""
    parts = " ".join(shlex.quote(p) for p in PIPELINE_PARTS)
    return f"hf download {shlex.quote(repo_id)} --include {parts} --local-dir DIR"


def _not_found(model: str, repo_id: str | None) -> ModelNotFoundError:
    rid = repo_id or model
    return ModelNotFoundError(
        f"model '{model}' is not a local folder, not in the local Hugging Face cache, and the hub is unreachable",
        f"download it where the hub is reachable ({download_command(rid)}) and pass "
        f"--model DIR, or add --random-weights to build the architecture offline (registry: {', '.join(names())})",
    )


def local_path(model: str, random_weights: bool = False) -> Path | None:
    """The local path :func:`load_model` reads for ``model``; ``None`` when it reads no path (a built-in registry
    model, a registry architecture with ``random_weights``, or nothing of that name here)."""
    spec = get_spec(model)
    if spec is not None and (spec.builtin or random_weights):
        return None
    path = Path(model).expanduser()
    return path if path.exists() else None


def load_model(model: str, random_weights: bool = False, seed: int = 0, config_of: str | None = None) -> ModelBundle:
    """Resolve ``model`` and load it on the CPU in fp32.

    Args:
        model: a registry name (``sd14``, ``sd15``, ``sd21-base``, ``tiny``, ``digits``), a local diffusers folder
            (pipeline or UNet), a single-file ``.safetensors`` checkpoint in the original SD layout, or a hub id.
        random_weights: build the registry architecture with seeded random weights instead of loading weights.
        seed: seed of the random weights.
        config_of: registry architecture of a single-file checkpoint (``None``: detected from its keys).

    Raises:
        ModelNotFoundError: within seconds, with the command that gets the model.
        UsageError: ``config_of`` for something other than a single file; see also :func:`load_single_file`.
    """
    spec = get_spec(model)
    path = local_path(model, random_weights)
    if config_of is not None and (path is None or not path.is_file()):
        raise UsageError(f"--config-of {config_of} applies to a single-file checkpoint, and '{model}' is not a file",
                         "drop --config-of (a folder's or registry model's config is its own)")
    if spec is not None and spec.builtin:
        if spec.name == "digits":
            return load_digits()
        return _random_bundle(spec, "builtin", seed)
    if random_weights:
        if spec is None:
            raise UsageError(f"--random-weights needs a registry name, got '{model}'", f"use one of {', '.join(names())}")
        return _random_bundle(spec, "random", seed)
    if path is not None:
        if path.is_file():
            return load_single_file(path, model, config_of)
        return _load_folder(path, model, f"local:{path.resolve()}")
    if Path(model).suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
        raise ModelNotFoundError(f"checkpoint file {model} does not exist", "check the path (relative paths start "
                                 "from the current folder)")
    if spec is None and ("/" not in model or model.startswith((".", "/", "~"))):
        raise ModelNotFoundError(
            f"'{model}' is neither a registry name, an existing folder or file nor a hub id",
            f"use one of {', '.join(names())}, a diffusers folder, a .safetensors checkpoint, or a hub id like owner/name",
        )
    repo_id = spec.hub_id if spec is not None else model
    cached = _from_cache(repo_id)
    if cached is not None:
        return _load_folder(cached, model, f"hf-cache:{repo_id}")
    if not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # no retries against an unreachable hub from here on
        raise _not_found(model, repo_id)
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, allow_patterns=PIPELINE_PARTS)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; the fix is the same
        raise ModelNotFoundError(f"could not download '{repo_id}' from the hub ({type(err).__name__}: {err})",
                                 "check the id and your access token (hf auth login), or pass a local --model DIR") from err
    return _load_folder(Path(path), model, f"hub:{repo_id}")
