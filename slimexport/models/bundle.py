"""A loaded model: the UNet plus what the calibration sampler needs (prompt encoder, scheduler, sizes)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn


def move(module: torch.nn.Module, device=None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``nn.Module.to`` without diffusers' override (which warns on every dtype cast)."""
    kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    return torch.nn.Module.to(module, **kwargs)


class Fp32Norm(nn.Module):
    """Run a GroupNorm/LayerNorm in fp32 inside a half-precision network (input upcast, output cast back).

    fp16 variance sums overflow on large activations (NaN/black images: NVIDIA/TensorRT#3039, #2564); in ONNX
    this exports as ``Cast -> norm (fp32) -> Cast``, which strongly typed TensorRT keeps in fp32.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)



def converted_copy(module: nn.Module, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                   fp32_norms: bool = False, force_copy: bool = False) -> nn.Module:
    """``module`` on ``device`` in ``dtype`` without touching the original, and without a second full copy.

    Returns ``module`` itself when nothing changes. Otherwise the copy is made by ``copy.deepcopy`` with every
    parameter and buffer pre-mapped to its converted tensor, so peak memory is the original plus the converted
    weights (never two copies of the original).

    Args:
        dtype: floating parameters and buffers are cast to it.
        fp32_norms: keep ``GroupNorm``/``LayerNorm`` weights in fp32 and wrap those layers in :class:`Fp32Norm`.
        force_copy: copy even when device and dtype already match.
    """
    norm_types = (nn.GroupNorm, nn.LayerNorm)
    params = list(module.parameters()) + list(module.buffers())
    cur_dev = params[0].device if params else torch.device("cpu")
    cur_dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)
    target_dev = torch.device(device) if device is not None else cur_dev
    target_dtype = dtype or cur_dtype
    same_dev = target_dev.type == cur_dev.type and (target_dev.index or 0) == (cur_dev.index or 0)
    if same_dev and target_dtype == cur_dtype and not fp32_norms and not force_copy:
        return module
    keep = set()
    if fp32_norms:
        for m in module.modules():
            if isinstance(m, norm_types):
                keep.update(id(t) for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for p in module.parameters():
            dt = torch.float32 if id(p) in keep else target_dtype if p.is_floating_point() else p.dtype
            # copy=True: a tensor whose device and dtype stay would otherwise be the original's storage, and an
            # in-place change of the copy (a re-initialised probe layer) would change the caller's model
            memo[id(p)] = nn.Parameter(p.detach().to(device=target_dev, dtype=dt, copy=True), requires_grad=False)
        for b in module.buffers():
            dt = torch.float32 if id(b) in keep else target_dtype if b.is_floating_point() else b.dtype
            memo[id(b)] = b.detach().to(device=target_dev, dtype=dt, copy=True)
    out = copy.deepcopy(module, memo)
    if fp32_norms:
        for name, m in list(out.named_modules()):
            if isinstance(m, norm_types) and name:
                parent_name, _, child = name.rpartition(".")
                parent = out.get_submodule(parent_name) if parent_name else out
                if isinstance(parent, Fp32Norm):
                    continue
                if child.isdigit():
                    parent[int(child)] = Fp32Norm(m)
                else:
                    setattr(parent, child, Fp32Norm(m))
    return out.eval().requires_grad_(False)



class PromptEncoder(Protocol):
    """Maps prompts to the UNet's conditioning.

    ``encode(prompts) -> (hidden [B, L, D], pooled [B, P])``: ``hidden`` feeds ``encoder_hidden_states``,
    ``pooled`` (L2-normalised by the caller) is the embedding SlimSet selects prompts with.
    ``pooled(prompts)``: ``encode(prompts)[1]``, possibly computed more cheaply.
    ``on_device(device)``: the encoder with its weights on ``device`` (itself, or a copy: never moved in place).
    """

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def pooled(self, prompts: list[str]) -> torch.Tensor: ...

    def on_device(self, device: str | torch.device) -> PromptEncoder: ...


class CLIPPromptEncoder:
    """Stable Diffusion's conditioning: CLIP last hidden state, pooled EOS embedding for SlimSet."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)

    def _ids(self, prompts: list[str], padding: str) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding=padding, max_length=self.tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids.to(self.text_encoder.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(self._ids(prompts, "max_length"))
        return out.last_hidden_state, out.pooler_output

    @torch.no_grad()
    def pooled(self, prompts: list[str]) -> torch.Tensor:
        """The pooled EOS embedding with the batch padded to its longest prompt, not to 77 tokens.

        Equal to ``encode(prompts)[1]`` up to float summation order: CLIP's causal mask keeps the padding after
        a prompt's EOS token out of that token's state, and the pooler reads the first EOS."""
        return self.text_encoder(self._ids(prompts, "longest")).pooler_output

    def on_device(self, device: str | torch.device) -> CLIPPromptEncoder:
        moved = converted_copy(self.text_encoder, device)
        return self if moved is self.text_encoder else CLIPPromptEncoder(self.tokenizer, moved)


@dataclass
class ModelBundle:
    """Everything the stages need from a model.

    Attributes:
        name: what the user passed to ``--model``.
        source: where the weights came from: ``builtin``, ``random``, ``local:PATH``, ``hf-cache:ID``, ``hub:ID``.
        unet: the diffusers ``UNet2DConditionModel`` (eval mode, on CPU until a stage moves it).
        encoder: prompt → conditioning.
        scheduler_config: config of the DDIM sampler used for calibration and trajectories.
        image_size: default (height, width) in pixels.
        vae_scale_factor: pixels per latent cell.
        components: extra pipeline parts (``tokenizer``, ``text_encoder``, ``vae``) where present.
        prompt_pool: the default calibration prompt pool for this model (``None``: the shipped SD pool).
    """

    name: str
    source: str
    unet: Any
    encoder: PromptEncoder
    scheduler_config: dict
    image_size: tuple[int, int]
    vae_scale_factor: int
    components: dict = field(default_factory=dict)
    prompt_pool: list[str] | None = None
    unet_source_dir: str | None = None
    fingerprint: str | None = None
    _encoder_fingerprint: str | None = field(default=None, repr=False, compare=False)

    def identity(self) -> str:
        """Content hash of what calibration depends on: UNet and encoder weights, the UNet's config, the sampler's
        config and the tokenizer's vocabulary (or, for ``--random-weights``, their seeded recipe)."""
        if self.fingerprint is None:
            import hashlib

            from slimexport.artifacts import sha256_json

            h = hashlib.sha256()
            tokenizer = getattr(self.encoder, "tokenizer", None)
            vocab = sha256_json(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else None
            def public(cfg) -> dict:
                """The settings given (a diffusers config.json), not diffusers' defaults for the rest (they change with
                diffusers' version) nor "_name_or_path" (where it was read from), "_diffusers_version", ..."""
                defaulted = set(dict(cfg).get("_use_default_values", []))
                return {k: v for k, v in dict(cfg).items() if not k.startswith("_") and k not in defaulted}

            h.update(sha256_json({"unet_config": public(self.unet.config), "scheduler": public(self.scheduler_config),
                                  "vocab": vocab}).encode())
            modules = [self.unet] + [m for m in (self.encoder, getattr(self.encoder, "text_encoder", None)) if isinstance(m, torch.nn.Module)]
            for mod in modules:
                for name, t in sorted(mod.state_dict().items()):
                    h.update(name.encode())
                    h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self.fingerprint = h.hexdigest()
        return self.fingerprint

    @property
    def weights_random(self) -> bool:
        """Whether the weights are random (``--random-weights``, or the built-in ``tiny`` test model): fidelity to such
        a model says little about a trained one."""
        return self.source == "random" or self.name == "tiny"

    def encoder_identity(self) -> str:
        """Content hash of the prompt encoder alone (its weights and the tokenizer's vocabulary): what prompt
        embeddings depend on, so a cache of them survives a new UNet."""
        if self._encoder_fingerprint is None:
            import hashlib

            from slimexport.artifacts import sha256_json

            h = hashlib.sha256()
            tokenizer = getattr(self.encoder, "tokenizer", None)
            h.update(sha256_json({"encoder": type(self.encoder).__name__,
                                  "vocab": tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None}).encode())
            for mod in (self.encoder, getattr(self.encoder, "text_encoder", None)):
                if isinstance(mod, torch.nn.Module):
                    for name, t in sorted(mod.state_dict().items()):
                        h.update(name.encode())
                        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._encoder_fingerprint = h.hexdigest()
        return self._encoder_fingerprint

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        h = height or self.image_size[0]
        w = width or self.image_size[1]
        return h // self.vae_scale_factor, w // self.vae_scale_factor

    def make_scheduler(self):
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config)

    def pipeline(self):
        """A diffusers ``StableDiffusionPipeline`` around this bundle's UNet (needs tokenizer, text encoder, VAE)."""
        from diffusers import StableDiffusionPipeline

        missing = [k for k in ("tokenizer", "text_encoder", "vae") if k not in self.components]
        if missing:
            from slimexport.errors import UsageError

            raise UsageError(f"model '{self.name}' has no {', '.join(missing)}", "load a full pipeline folder")
        return StableDiffusionPipeline(
            vae=self.components["vae"], text_encoder=self.components["text_encoder"],
            tokenizer=self.components["tokenizer"], unet=self.unet, scheduler=self.make_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
