"""Models built from configs with seeded random weights (no download): the UNet, the CLIP text encoder, the tiny
VAE, and the character tokenizer shipped with slimexport.

Every loader uses these (built-in models, ``--random-weights``, the architecture that checkpoint weights are loaded
into), so they live apart from the loaders: ``load.py`` and ``digits.py`` both import from here.
"""

from __future__ import annotations

from importlib import resources

import torch

from slimexport.models.registry import TINY_TEXT, TINY_VAE


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
    """A ``CLIPTextModel`` of ``text_config`` sized to ``tokenizer`` (vocabulary, BOS/EOS ids), seeded random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = dict(text_config)
    cfg["vocab_size"] = len(tokenizer)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(CLIPTextConfig(**cfg, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))
    return model.eval().requires_grad_(False)


def stand_in_text_encoder(width: int, seed: int = 0):
    """``(tokenizer, text_encoder)`` for a UNet that came without its text encoder: the character tokenizer and a
    random one-head ``tiny``-sized CLIP text encoder of the UNet's context ``width`` (conditioning, not meaning)."""
    tokenizer = char_tokenizer()
    return tokenizer, build_text_encoder(dict(TINY_TEXT, hidden_size=width, num_attention_heads=1), tokenizer, seed)


def build_vae(config: dict, seed: int = 0):
    """An ``AutoencoderKL`` with the given config and seeded random weights."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**config)
    return vae.eval().requires_grad_(False)


def build_tiny_vae(seed: int = 0):
    return build_vae(TINY_VAE, seed)
