"""The model registry: exact names, hub ids and full UNet configs.

``attention_head_dim`` in diffusers' SD1.x/SD2.x configs is (for historical reasons) the *number of heads*;
this module is the one place that knows it. Everywhere else uses ``num_heads`` and ``head_dim``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slimexport.errors import UsageError

# Stable Diffusion's own training schedule (scaled-linear betas); the calibration sampler is DDIM on it.
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

_SD1_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # = 8 heads (diffusers' legacy name)
    "use_linear_projection": False,
}

_SD21_BASE_UNET = {
    **_SD1_UNET,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],  # = heads per level: 64-dim heads
    "use_linear_projection": True,
}

_SD1_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
    "num_hidden_layers": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
}
_SD2_TEXT = {
    "vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
    "num_hidden_layers": 23, "max_position_embeddings": 77, "hidden_act": "gelu",
}

# The ``AutoencoderKL`` of SD1.x and SD2.x (the vae/config.json of their diffusers pipelines): 8 pixels per latent.
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry.

    Attributes:
        name: the ``--model`` name.
        hub_id: Hugging Face repository of the real weights (``None`` for built-in models).
        unet_config: full ``UNet2DConditionModel`` config: ``--random-weights`` builds this architecture offline.
        text_config: ``CLIPTextModel`` config for random weights.
        vae_config: ``AutoencoderKL`` config (``None``: the model has no VAE).
        builtin: built by slimexport itself (``tiny``, ``digits``): no download ever.
        scheduler: scheduler config of the calibration sampler.
        default_image: default (height, width) in pixels.
        vae_scale_factor: pixels per latent cell.
    """

    name: str
    hub_id: str | None
    unet_config: dict
    text_config: dict | None
    builtin: bool = False
    scheduler: dict = field(default_factory=lambda: dict(SD_SCHEDULER))
    default_image: tuple[int, int] = (512, 512)
    vae_scale_factor: int = 8
    description: str = ""
    vae_config: dict | None = None


TINY_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 2,  # = 2 heads: head_dim 16 and 32
    "use_linear_projection": False,
}

TINY_TEXT = {
    "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
    "num_hidden_layers": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
}

TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"], "block_out_channels": [8, 16],
    "latent_channels": 4, "norm_num_groups": 4, "layers_per_block": 1,
}

# The shipped ``digits`` model (slimexport/models/digits.py, trained by tools/train_digits.py): SD1's block family
# on 16×16 one-channel pixels. 4 heads everywhere: head_dim 16 at 64 channels, 32 at 128; GEGLU widths 256 / 512.
DIGITS_UNET = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [64, 128],
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,  # = 4 heads (diffusers' legacy name)
    "use_linear_projection": False,
}

# The schedule ``digits`` was trained with: 1000-step cosine betas (better than SD's scaled-linear for 16×16 pixels,
# which the linear schedule destroys too early), epsilon prediction; x0 clipped to the pixel range [-1, 1], and the
# last DDIM step lands on alpha=1 (pixels, not latents: the sampler should end on a clean image).
DIGITS_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,  # unused by the cosine schedule; diffusers' default
    "beta_end": 0.02,  # unused by the cosine schedule; diffusers' default
    "beta_schedule": "squaredcos_cap_v2",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

REGISTRY: dict[str, ModelSpec] = {
    "sd14": ModelSpec("sd14", "CompVis/stable-diffusion-v1-4", _SD1_UNET, _SD1_TEXT, vae_config=SD_VAE,
                      description="Stable Diffusion v1.4 (860M UNet)"),
    "sd15": ModelSpec("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", _SD1_UNET, _SD1_TEXT, vae_config=SD_VAE,
                      description="Stable Diffusion v1.5 (860M UNet)"),
    "sd21-base": ModelSpec("sd21-base", "stabilityai/stable-diffusion-2-1-base", _SD21_BASE_UNET, _SD2_TEXT,
                           vae_config=SD_VAE,
                           description="Stable Diffusion v2.1 base (865M UNet, linear proj_in/out, 64-dim heads)"),
    "tiny": ModelSpec("tiny", None, TINY_UNET, TINY_TEXT, builtin=True, default_image=(32, 32), vae_scale_factor=2,
                      vae_config=TINY_VAE,
                      description="SD1-shaped test UNet, random weights (seed 0), tiny text encoder and tokenizer"),
    "digits": ModelSpec("digits", None, DIGITS_UNET, None, builtin=True, scheduler=DIGITS_SCHEDULER,
                        default_image=(16, 16), vae_scale_factor=1,
                        description="SD1-family UNet (4.2M) trained on sklearn's 8x8 digits at 16x16; class-token conditioning"),
}


SUPPORTED_FIX = "slimexport handles SD1.x/SD2.x text-to-image UNets only; pass one of those (e.g. a Stable Diffusion 1.5 or 2.1 folder)"


def check_supported_unet(config: dict, where: str | Path) -> None:
    """Refuse UNets that are not SD1.x/SD2.x text-to-image ones: calibration feeds only (latents, timestep, text).

    Raises:
        UsageError: naming the config field that makes the UNet unsupported.
    """
    reasons = [
        ("_class_name", lambda v: v not in (None, "UNet2DConditionModel"), "a UNet of another class"),
        ("addition_embed_type", lambda v: v is not None, "extra conditioning, as in SDXL"),
        ("class_embed_type", lambda v: v is not None, "an extra embedding input, as in SD 2.1 unCLIP"),
        ("num_class_embeds", lambda v: v is not None, "class-label conditioning, as in the SD x4 upscaler"),
        ("encoder_hid_dim_type", lambda v: v is not None, "a projected text or image embedding, as in Kandinsky or DeepFloyd IF"),
    ]
    for key, bad, what in reasons:
        if bad(config.get(key)):
            raise UsageError(f"{where}: {key}={config[key]!r} ({what}) is not supported", SUPPORTED_FIX)
    c_in, c_out = config.get("in_channels", 4), config.get("out_channels", 4)
    if c_in != c_out:
        raise UsageError(f"{where}: in_channels={c_in} != out_channels={c_out} (an inpainting, depth or "
                         "image-conditioned UNet) is not supported", SUPPORTED_FIX)


def register(spec: ModelSpec) -> None:
    REGISTRY[spec.name] = spec


def get_spec(name: str) -> ModelSpec | None:
    return REGISTRY.get(name)


def names() -> list[str]:
    return sorted(REGISTRY)


def checkpoint_configs() -> list[str]:
    """The registry names a single-file checkpoint can be loaded as (``--config-of``): those with a CLIP text
    encoder config, i.e. all but ``digits``."""
    return sorted(n for n, spec in REGISTRY.items() if spec.text_config is not None)
