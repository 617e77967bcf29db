"""Model loading: registry name → built-in model, random weights, local folder, local HF cache, hub.

Lookup order for ``--model X``: built-in (``tiny``, ``digits``) → ``--random-weights`` (registry config) →
local folder → local Hugging Face cache (offline) → the hub, only if it answers within seconds. Weights are
read from safetensors only: a folder with only pickled ``.bin`` weights is refused.
"""

from __future__ import annotations

import logging
import os
import socket
from importlib import resources
from pathlib import Path

import torch

from slimexport.errors import ModelNotFoundError, UsageError
from slimexport.models.bundle import CLIPPromptEncoder, ModelBundle
from slimexport.models.registry import TINY_TEXT, ModelSpec, get_spec, names

log = logging.getLogger(__name__)

HUB_HOST = ("huggingface.co", 443)
HUB_PROBE_SECONDS = 3.0
# What a pipeline folder needs here: configs and the safetensors weights (default variant, shards included), not
# the .bin pickles, fp16/non_ema variants or ONNX/Flax copies that hub repos also hold (SD1.4: ~4 GB, not ~20 GB).
PIPELINE_PARTS = ["model_index.json", "tokenizer/*", "scheduler/*",
                  "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                  "unet/diffusion_pytorch_model-*-of-*.safetensors", "unet/diffusion_pytorch_model.safetensors.index.json",
                  "text_encoder/config.json", "text_encoder/model.safetensors",
                  "text_encoder/model-*-of-*.safetensors", "text_encoder/model.safetensors.index.json"]


def char_tokenizer(max_length: int = 77):
    """A byte-level CLIP tokenizer with no merges (one token per character), shipped with slimexport.

    Used by ``tiny`` and by ``--random-weights`` models, where the real CLIP vocabulary cannot be downloaded.
    """
    from transformers import CLIPTokenizer

    folder = resources.files("slimexport") / "data" / "char_tokenizer"
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def build_unet(config: dict, seed: int = 0):
    """A ``UNet2DConditionModel`` with the given config and seeded random weights (no download)."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config)
    return unet.eval().requires_grad_(False)


def build_text_encoder(text_config: dict, tokenizer, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = dict(text_config)
    cfg["vocab_size"] = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(CLIPTextConfig(**cfg, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))
    return model.eval().requires_grad_(False)


def build_tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], block_out_channels=[8, 16],
            latent_channels=4, norm_num_groups=4, layers_per_block=1,
        )
    return vae.eval().requires_grad_(False)


def _random_bundle(spec: ModelSpec, source: str, seed: int = 0) -> ModelBundle:
    tokenizer = char_tokenizer()
    text_encoder = build_text_encoder(spec.text_config or TINY_TEXT, tokenizer, seed=seed + 1)
    components = {"tokenizer": tokenizer, "text_encoder": text_encoder}
    if spec.name == "tiny":
        components["vae"] = build_tiny_vae(seed + 2)
    import diffusers
    import transformers

    from slimexport.artifacts import sha256_json

    recipe = sha256_json({"unet": spec.unet_config, "text": spec.text_config, "seed": seed, "tokenizer": "char-v1",
                          "scheduler": dict(spec.scheduler),
                          "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__})
    return ModelBundle(
        name=spec.name, source=source, unet=build_unet(spec.unet_config, seed), encoder=CLIPPromptEncoder(tokenizer, text_encoder),
        scheduler_config=dict(spec.scheduler), image_size=spec.default_image, vae_scale_factor=spec.vae_scale_factor,
        components=components, fingerprint=f"recipe:{recipe}",
    )


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def _from_pretrained(cls, path: Path, **kwargs):
    """``cls.from_pretrained(path)``, turning a broken folder (unreadable config or weights) into a one-line error."""
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"cannot load {cls.__name__} from {path} ({reason})",
                         "re-download the model or re-save it with save_pretrained(..., safe_serialization=True)") from err


def _load_folder(folder: Path, name: str, source: str) -> ModelBundle:
    """A diffusers pipeline folder (``model_index.json``) or a UNet folder (``config.json`` of a UNet)."""
    from diffusers import UNet2DConditionModel

    folder = folder.resolve()
    if (folder / "slim_plan.json").exists():
        raise UsageError(f"{folder} is a slim UNet folder, not a dense model", "pass the dense model it was made from")
    if not (folder / "model_index.json").exists() and (folder / "config.json").exists() and (folder.parent / "model_index.json").exists():
        folder = folder.parent  # a pipeline's unet/ subfolder: use the whole pipeline (text encoder for calibration)
    if (folder / "model_index.json").exists():
        unet_dir = folder / "unet"
        if not unet_dir.is_dir():
            raise UsageError(f"pipeline folder {folder} has no unet/ subfolder", "pass a complete diffusers pipeline folder")
        if not _has_safetensors(unet_dir):
            raise UsageError(
                f"{unet_dir} has no .safetensors weights (pickled .bin files are never loaded)",
                "convert them once with diffusers (save_pretrained(..., safe_serialization=True)) and pass the new folder",
            )
        unet = _from_pretrained(UNet2DConditionModel, unet_dir, use_safetensors=True).eval().requires_grad_(False)
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = _from_pretrained(CLIPTokenizer, folder / "tokenizer")
        text_encoder = _from_pretrained(CLIPTextModel, folder / "text_encoder", use_safetensors=True).eval().requires_grad_(False)
        components = {"tokenizer": tokenizer, "text_encoder": text_encoder}
        if (folder / "vae").is_dir() and _has_safetensors(folder / "vae"):
            from diffusers import AutoencoderKL

            components["vae"] = _from_pretrained(AutoencoderKL, folder / "vae", use_safetensors=True).eval()
        sched_cfg = _scheduler_config(folder / "scheduler")
        encoder = CLIPPromptEncoder(tokenizer, text_encoder)
        vae_scale = 8
        unet_dir_str = str(unet_dir)
    elif (folder / "config.json").exists():
        if not _has_safetensors(folder):
            raise UsageError(f"{folder} has no .safetensors weights (pickled .bin files are never loaded)",
                             "convert them once with diffusers (save_pretrained(..., safe_serialization=True))")
        unet = _from_pretrained(UNet2DConditionModel, folder, use_safetensors=True).eval().requires_grad_(False)
        log.warning(
            "%s is a UNet-only folder: calibration conditions on a random text encoder of width %d; "
            "pass the pipeline folder for real prompt conditioning", folder, unet.config.cross_attention_dim,
        )
        tokenizer = char_tokenizer()
        text_cfg = dict(TINY_TEXT, hidden_size=unet.config.cross_attention_dim, num_attention_heads=1)
        text_encoder = build_text_encoder(text_cfg, tokenizer)
        components = {"tokenizer": tokenizer, "text_encoder": text_encoder}
        encoder = CLIPPromptEncoder(tokenizer, text_encoder)
        from slimexport.models.registry import SD_SCHEDULER

        sched_cfg, vae_scale, unet_dir_str = dict(SD_SCHEDULER), 8, str(folder)
    else:
        raise UsageError(f"{folder} is not a diffusers folder (no model_index.json or config.json)",
                         "pass a StableDiffusionPipeline folder or its unet/ subfolder")
    size = int(unet.config.sample_size) * vae_scale
    return ModelBundle(name=name, source=source, unet=unet, encoder=encoder, scheduler_config=sched_cfg,
                       image_size=(size, size), vae_scale_factor=vae_scale, components=components,
                       unet_source_dir=unet_dir_str)


def _scheduler_config(folder: Path) -> dict:
    import json

    from slimexport.models.registry import SD_SCHEDULER

    cfg = dict(SD_SCHEDULER)
    path = folder / "scheduler_config.json"
    if path.exists():
        src = json.loads(path.read_text())
        for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset"):
            if k in src:
                cfg[k] = src[k]
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


def _not_found(model: str, repo_id: str | None) -> ModelNotFoundError:
    rid = repo_id or model
    return ModelNotFoundError(
        f"model '{model}' is not a local folder, not in the local Hugging Face cache, and the hub is unreachable",
        f"download it where the hub is reachable (huggingface-cli download {rid} --include "
        "'unet/*' 'text_encoder/*' 'tokenizer/*' 'scheduler/*' model_index.json --local-dir DIR) and pass "
        f"--model DIR, or add --random-weights to build the architecture offline (registry: {', '.join(names())})",
    )


def load_model(model: str, random_weights: bool = False, seed: int = 0) -> ModelBundle:
    """Resolve ``model`` and load it on the CPU in fp32.

    Args:
        model: a registry name (``sd14``, ``sd15``, ``sd21-base``, ``tiny``, ``digits``), a local diffusers folder
            (pipeline or UNet) or a hub id.
        random_weights: build the registry architecture with seeded random weights instead of loading weights.
        seed: seed of the random weights.

    Raises:
        ModelNotFoundError: within seconds, with the command that gets the model.
    """
    spec = get_spec(model)
    if spec is not None and spec.builtin:
        if spec.name == "digits":
            from slimexport.models.digits import load_digits

            return load_digits()
        return _random_bundle(spec, "builtin", seed)
    if random_weights:
        if spec is None:
            raise UsageError(f"--random-weights needs a registry name, got '{model}'", f"use one of {', '.join(names())}")
        return _random_bundle(spec, "random", seed)
    path = Path(model).expanduser()
    if path.exists():
        return _load_folder(path, model, f"local:{path.resolve()}")
    if spec is None and ("/" not in model or model.startswith((".", "/", "~"))):
        raise ModelNotFoundError(
            f"'{model}' is neither a registry name, an existing folder nor a hub id",
            f"use one of {', '.join(names())}, a diffusers folder, or a hub id like owner/name",
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
                                 "check the id and your access token (huggingface-cli login), or pass a local --model DIR") from err
    return _load_folder(Path(path), model, f"hub:{repo_id}")
